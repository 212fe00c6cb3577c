"""Storage benchmark: query latency and registration throughput through the handlers, on a realistic volume.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python benchmarks/storage.py
    python benchmarks/storage.py --reuse              # measure again on the databases loaded before
    python benchmarks/storage.py --huge               # 100,000, 1,000,000 and 10,000,000 (not in CI)
    python benchmarks/storage.py --certificates 20000 --skip-registrations

For every size N of `--certificates` (default 100,000 and 1,000,000; `--huge` adds 10,000,000), in a database of
its own (`intyg_bench_<N>`), and at the end the query p99s of all sizes side by side:
1. creates the database next to DATABASE_URL and migrates it;
2. loads N certificates (documents about 1 KB) for N/5 patients with COPY: mixed types, each patient's
   certificates from 2-3 of the care givers, some archived, sent or revoked, some without a care copy, consent
   for most patients (indexes and keys are dropped during the load and rebuilt after, exactly as migrated);
3. VACUUM ANALYZE;
4. certificate.list, certificate.get and certificate.list-for-care, each `--calls` times for random patients /
   certificates after a warm-up, every call as the service runs it: `pipeline.parse` + `pipeline.process` in a
   `SqlUnitOfWork` of its own (read-only: rolled back) + the reply serialised to JSON;
5. (at the largest size) `--registrations` new certificates through the register handler, (a) one message per transaction,
   (b) `--batch` messages per transaction with a savepoint each and (c) the same without savepoints (the message
   loop tries (c) first and falls back to (b) when a message of the batch fails; both with its warm-up query when
   the unit of work has one); the certificates registered here are deleted afterwards, so `--reuse` measures the
   same data again;
6. the access log (CONTRACT §9): `--access-log-entries` entries (default 1,000,000; `--access-log-entries
   10000000` for the full figure) for random certificates of the loaded data, loaded in SQL with the indexes
   rebuilt after; then `access-log.list` p99 (first page of 100 and a page with a date range) for random patients
   with entries, and what the log adds to `certificate.get-for-care`: the same handler with the log and with its
   `record` replaced by a no-op, every call committed as the message loop commits (one message per transaction,
   and `--batch` per transaction), `--access-log-runs` runs each, the median shown.
It prints figures; it is not a test.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from consumers.pipeline import Envelope, Policy, parse, process, subject  # noqa: E402
from domain.model import fingerprint  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.testdata import personnummer  # noqa: E402
from storage import migrate  # noqa: E402
from storage.engine import make_engine  # noqa: E402
from storage.uow import SqlUnitOfWork  # noqa: E402

LOADED_TABLES = ("certificates", "certificate_documents", "certificate_statuses")
EMPTIED_TABLES = ("certificates", "certificate_documents", "certificate_statuses", "tombstones", "consents",
                  "inbox", "outbox", "bulk_progress", "access_log")
READER = {"person_id": "SE2321000016-P000001", "name": "Ajla Doktor", "care_unit_id": "SE2321000016-G000U000"}
TYPES = {  # type -> weight (percent); db and doi are death certificates, never shown to the citizen
    "lisjp": 30, "fk7263": 8, "luse": 10, "luae_na": 5, "luae_fs": 5, "ts-bas": 8, "ts-diabetes": 5,
    "tstrk1009": 3, "tstrk1062": 2, "af00213": 5, "af00251": 3, "ag114": 5, "ag7804": 8, "db": 2, "doi": 1,
}
RECIPIENT_OF = {"fk7263": "FKASSA", "lisjp": "FKASSA", "luse": "FKASSA", "luae_na": "FKASSA", "luae_fs": "FKASSA",
                "ts-bas": "TRANSP", "ts-diabetes": "TRANSP", "tstrk1009": "TRANSP", "tstrk1062": "TRANSP",
                "af00213": "AF", "af00251": "AF", "db": "SKV", "doi": "SOS"}
CARE_GIVERS = 21  # the regions
UNITS_PER_GIVER = 12
CONSENT_SHARE = 0.9
ARCHIVED_SHARE, SENT_SHARE, REVOKED_SHARE, CITIZEN_ONLY_SHARE = 0.10, 0.30, 0.02, 0.05
LOREM = ("Patienten söker för nedstämdhet, sömnsvårigheter och trötthet sedan tre månader. Bedömning: "
         "måttlig depressiv episod. Arbetsförmågan är nedsatt till hälften; åter i arbete på heltid planeras "
         "efter rehabilitering med KBT och successiv upptrappning. Ingen pågående medicinsk behandling som "
         "påverkar körförmåga. ")


# --- data ---------------------------------------------------------------------------------------------------------
def patient_id(i: int) -> str:
    """A valid personnummer for patient number i (serials 001-999 per birth date from 1930-01-01)."""
    born = dt.date(1930, 1, 1) + dt.timedelta(days=i // 999)
    return personnummer(born, i % 999 + 1)


def giver_id(g: int) -> str:
    return f"SE2321000016-G{g:03d}"


def unit_id(g: int, u: int) -> str:
    return f"SE2321000016-G{g:03d}U{u:03d}"


def issued_by(g: int, u: int) -> dict:
    return {"person_id": f"SE2321000016-P{g:03d}{u:03d}", "name": "Ajla Doktor",
            "care_unit": {"id": unit_id(g, u), "name": f"Vårdenhet {u}"},
            "care_giver": {"id": giver_id(g), "name": f"Region {g}"}}


def document_for(certificate_id: str, kind: str, rng: random.Random) -> str:
    start = rng.randrange(len(LOREM))
    body = (LOREM[start:] + LOREM * 4)[:820]
    return (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<intyg typ=\"{kind}\" id=\"{certificate_id}\">\n"
            f"  <text>{body}</text>\n  <underskrift>Ajla Doktor, leg. läkare</underskrift>\n</intyg>\n")


def certificate_json(certificate_id: str, kind: str, patient: str, signed_at: dt.datetime, g: int, u: int,
                     rng: random.Random) -> dict:
    valid_from = signed_at.date()
    return {"id": certificate_id, "type": kind, "type_version": "1.3", "patient_id": patient,
            "signed_at": signed_at.isoformat(), "valid_from": valid_from.isoformat(),
            "valid_to": (valid_from + dt.timedelta(days=30)).isoformat(), "issued_by": issued_by(g, u),
            "test_certificate": False, "relations": [],
            "document": {"media_type": "application/xml", "encoding": "utf-8",
                         "content": document_for(certificate_id, kind, rng)}}


def _copy_text(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _patients_plan(n_patients: int, rng: random.Random):
    """Per patient: consent, and the 2-3 care givers (with a few units each) their certificates come from."""
    plan = []
    for i in range(n_patients):
        givers = rng.sample(range(CARE_GIVERS), rng.choice((2, 3)))
        units = {g: rng.sample(range(UNITS_PER_GIVER), 2) for g in givers}
        plan.append((patient_id(i), rng.random() < CONSENT_SHARE, givers, units))
    return plan


def load(conn: psycopg.Connection, n_certificates: int, n_patients: int, seed: int) -> dict:
    rng = random.Random(seed)
    plan = _patients_plan(n_patients, rng)
    types, weights = list(TYPES), list(TYPES.values())
    zone = dt.timezone(dt.timedelta(hours=1))
    start = dt.datetime(2021, 1, 1, tzinfo=zone)
    span = 5 * 365 * 86400
    stats = {"archived": 0, "sent": 0, "revoked": 0, "citizen_only": 0, "statuses": 0}
    with conn.cursor() as cur:
        cur.execute("SET synchronous_commit = off")
        cur.execute("SET maintenance_work_mem = '512MB'")
        cur.execute("TRUNCATE " + ", ".join(EMPTIED_TABLES))
        constraints, indexes = _drop_keys(cur, LOADED_TABLES)
        with cur.copy("COPY consents (patient_id, given, changed_at) FROM STDIN WITH (FREEZE)") as copy:
            for pid, given, _, _ in plan:
                copy.write_row((pid, given, start))
        chunk = 20_000
        made = 0
        while made < n_certificates:
            rows_c, rows_d, rows_s = [], [], []
            for _ in range(min(chunk, n_certificates - made)):
                made += 1
                pid, consent, givers, units = plan[rng.randrange(n_patients)]
                g = rng.choice(givers)
                u = rng.choice(units[g])
                kind = rng.choices(types, weights)[0]
                cid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
                signed = start + dt.timedelta(seconds=rng.randrange(span))
                wire = certificate_json(cid, kind, pid, signed, g, u, rng)
                digest = fingerprint(wire)
                document = wire.pop("document")
                at = signed + dt.timedelta(minutes=5)
                statuses = [("RECEIVED", None, at)]
                archived = kind not in ("db", "doi") and consent and rng.random() < ARCHIVED_SHARE
                if archived:
                    statuses.append(("ARCHIVED", None, at + dt.timedelta(days=2)))
                if kind in RECIPIENT_OF and rng.random() < SENT_SHARE:
                    statuses.append(("SENT", RECIPIENT_OF[kind], at + dt.timedelta(hours=1)))
                revoked_at = None
                if rng.random() < REVOKED_SHARE:
                    revoked_at = at + dt.timedelta(days=3)
                    statuses.append(("REVOKED", wire["issued_by"]["person_id"], revoked_at))
                care = not (consent and rng.random() < CITIZEN_ONLY_SHARE)  # never without both (the rule)
                if not care:
                    statuses.append(("CARE_COPY_REMOVED", giver_id(g), at + dt.timedelta(days=30)))
                stats["archived"] += archived
                stats["sent"] += any(s[0] == "SENT" for s in statuses)
                stats["revoked"] += revoked_at is not None
                stats["citizen_only"] += not care
                stats["statuses"] += len(statuses)
                rows_c.append("\t".join((
                    cid, pid, kind, "1.3", signed.isoformat(), wire["valid_from"], wire["valid_to"],
                    unit_id(g, u), giver_id(g), "f", digest,
                    _copy_text(json.dumps(wire, ensure_ascii=False)), "t" if care else "f", "t" if archived else "f",
                    revoked_at.isoformat() if revoked_at else "\\N", at.isoformat())))
                rows_d.append(f"{cid}\tapplication/xml\tutf-8\t{_copy_text(document['content'])}")
                rows_s.extend(f"{cid}\t{n}\t{s}\t{t or chr(92) + 'N'}\t{when.isoformat()}"
                              for n, (s, t, when) in enumerate(statuses))
            _copy(cur, "certificates (id, patient_id, type, type_version, signed_at, valid_from, valid_to, "
                       "care_unit_id, care_giver_id, test_certificate, fingerprint, content, available_to_care, "
                       "archived, revoked_at, registered_at)", rows_c)
            _copy(cur, "certificate_documents (certificate_id, media_type, encoding, content)", rows_d)
            _copy(cur, "certificate_statuses (certificate_id, position, status, target, at)", rows_s)
            if made % 100_000 < chunk:
                print(f"  {made:>10,} certificates copied", flush=True)
        print("  rebuilding keys and indexes", flush=True)
        _restore_keys(cur, constraints, indexes)
    conn.commit()
    return stats


def _copy(cur, target: str, lines: list[str]) -> None:
    with cur.copy(f"COPY {target} FROM STDIN WITH (FREEZE)") as copy:
        copy.write(("\n".join(lines) + "\n").encode())


def _drop_keys(cur, loaded: tuple[str, ...]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Drop the loaded tables' indexes and keys (to rebuild them once after the load), remembering their exact
    definitions: what comes back is what the migration made."""
    tables = list(loaded)
    cur.execute("""SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), contype
                   FROM pg_constraint WHERE conrelid = ANY(%s::regclass[]) AND contype IN ('p', 'f')
                   ORDER BY contype = 'f', conname""", (tables,))
    constraints = [(t, n, d) for t, n, d, _ in cur.fetchall()]
    cur.execute("""SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' AND tablename = ANY(%s)
                   AND indexname NOT IN (SELECT conname FROM pg_constraint WHERE contype = 'p')
                   ORDER BY indexname""", (tables,))
    found = cur.fetchall()
    indexes = [definition for _, definition in found]
    for table, name, _ in reversed(constraints):  # foreign keys first
        cur.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(sql.Identifier(table), sql.Identifier(name)))
    for name, _ in found:
        cur.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))
    return constraints, indexes


def _restore_keys(cur, constraints, indexes) -> None:
    for table, name, definition in constraints:  # primary keys first (ordered so), then foreign keys
        cur.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ").format(sql.Identifier(table), sql.Identifier(name))
                    + sql.SQL(definition))
    for definition in indexes:
        cur.execute(definition)


# --- measuring ----------------------------------------------------------------------------------------------------
def sample(conn: psycopg.Connection, size: int, seed: int) -> list[tuple]:
    """Random certificates a citizen can see (consent given, not a death certificate), with their care data."""
    rows = conn.execute(
        """SELECT c.id, c.patient_id, c.care_giver_id, c.care_unit_id
           FROM certificates c TABLESAMPLE BERNOULLI (%s::real) REPEATABLE (%s)
           JOIN consents k ON k.patient_id = c.patient_id AND k.given
           WHERE c.type NOT IN ('db', 'doi') AND c.available_to_care""",
        (min(100.0, 100.0 * size * 3 / max(1, _count(conn, "certificates"))), seed)).fetchall()
    random.Random(seed).shuffle(rows)
    return rows[:size]


def _count(conn, table: str) -> int:
    return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()[0]


def query_envelopes(kind: str, rows: list[tuple], rng: random.Random) -> list[Envelope]:
    out = []
    for cid, pid, giver, unit in rows:
        if kind == "certificate.list":
            body = {"patient_id": pid}
        elif kind == "certificate.get":
            body = {"certificate_id": cid, "patient_id": pid}
        else:  # the unit the certificate is from, and two more of the care giver's
            g = int(giver.rsplit("G", 1)[1])
            units = {unit} | {unit_id(g, u) for u in rng.sample(range(UNITS_PER_GIVER), 2)}
            body = {"patient_id": pid, "care_giver_id": giver, "care_unit_ids": sorted(units), "accessed_by": READER}
        out.append(Envelope(routing_key=kind, body=json.dumps(body).encode(), message_id=str(uuid.uuid4()),
                            reply_to="amq.rabbitmq.reply-to", content_type="application/json"))
    return out


def run_query(engine, policy: Policy, envelope: Envelope) -> tuple[float, float]:
    """One query as the service handles it; (wall, CPU) seconds. CPU time is this process's own work (Python and
    the driver); wall minus CPU is waiting: for PostgreSQL, and for a CPU when other processes want it too."""
    started, cpu = time.perf_counter(), time.process_time()
    parsed = parse(envelope, policy)
    with SqlUnitOfWork(engine) as uow:
        processed = process(parsed, uow, policy)
    reply = processed.reply
    body = reply.model_dump_json().encode() if reply is not None else b""  # what the reply carries
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    if reply is None or reply.result.value != "OK" or not body:
        raise RuntimeError(f"{envelope.routing_key} answered {reply}")
    return elapsed, cpu


def measure_queries(engine, policy: Policy, rows: list[tuple], calls: int, warmup: int,
                    seed: int) -> dict[str, tuple[list[float], list[float]]]:
    rng = random.Random(seed)
    results = {}
    for kind in ("certificate.list", "certificate.get", "certificate.list-for-care"):
        envelopes = query_envelopes(kind, [rng.choice(rows) for _ in range(calls + warmup)], rng)
        results[kind] = timed_queries(engine, policy, envelopes, warmup)
    return results


def timed_queries(engine, policy: Policy, envelopes: list[Envelope], warmup: int) -> tuple[list[float], list[float]]:
    """Run the first `warmup` envelopes untimed, then the rest: (wall times, CPU times) of each, in seconds."""
    for envelope in envelopes[:warmup]:
        run_query(engine, policy, envelope)
    gc.collect()
    timings = [run_query(engine, policy, envelope) for envelope in envelopes[warmup:]]
    return [wall for wall, _ in timings], [cpu for _, cpu in timings]


# --- the access log (CONTRACT §9) ----------------------------------------------------------------------------------
def load_access_log(conn: psycopg.Connection, entries: int, seed: int) -> None:
    """`entries` entries for random certificates (so about entries / patients per patient), at random times in
    the last five years, in one INSERT ... SELECT with the table's keys dropped and rebuilt after."""
    with conn.cursor() as cur:
        cur.execute("SET synchronous_commit = off")
        cur.execute("SET maintenance_work_mem = '512MB'")
        cur.execute("SELECT setseed(%s)", (random.Random(seed).random(),))
        cur.execute("TRUNCATE access_log")
        constraints, indexes = _drop_keys(cur, ("access_log",))
        cur.execute("""CREATE TEMP TABLE bench_log_certificates AS
                       SELECT row_number() OVER () AS n, id, type, patient_id, care_giver_id, care_unit_id
                       FROM certificates""")
        cur.execute("CREATE UNIQUE INDEX ON bench_log_certificates (n)")
        total = _count(conn, "certificates")
        done = 0
        while done < entries:  # in chunks, so that progress shows and no statement runs for many minutes
            step = min(2_000_000, entries - done)
            cur.execute("""
                INSERT INTO access_log (message_id, certificate_id, at, action, certificate_type, patient_id,
                                        care_giver_id, person_id, person_name, care_unit_id)
                SELECT 'bench-log-' || s.g, c.id,
                       now() - random() * interval '5 years',
                       (ARRAY['READ', 'LIST', 'LIST', 'LIST', 'REVOKE', 'REMOVE_CARE_COPY', 'SEND'])[1 + (s.g %% 7)],
                       c.type, c.patient_id, c.care_giver_id,
                       'SE2321000016-P' || lpad((s.g %% 5000)::text, 6, '0'), 'Ajla Doktor', c.care_unit_id
                FROM (SELECT g, 1 + floor(random() * %s)::bigint AS pick FROM generate_series(%s::bigint, %s::bigint) AS g) s
                JOIN bench_log_certificates c ON c.n = s.pick""",
                        (total, done + 1, done + step))
            done += step
            print(f"  {done:>10,} access log entries", flush=True)
        print("  rebuilding the access log's keys and indexes", flush=True)
        _restore_keys(cur, constraints, indexes)
        cur.execute("DROP TABLE bench_log_certificates")
    conn.commit()
    conn.autocommit = True
    conn.execute("VACUUM ANALYZE access_log")
    conn.autocommit = False


def access_log_envelopes(patients: list[str], rng: random.Random, dated: bool) -> list[Envelope]:
    out = []
    for pid in patients:
        body: dict = {"patient_id": pid}
        if dated:  # a year of the five
            first = dt.date.today() - dt.timedelta(days=rng.randrange(365, 4 * 365))
            body.update({"from": first.isoformat(), "to": (first + dt.timedelta(days=365)).isoformat()})
        out.append(Envelope(routing_key="access-log.list", body=json.dumps(body).encode(),
                            message_id=str(uuid.uuid4()), reply_to="amq.rabbitmq.reply-to",
                            content_type="application/json"))
    return out


def measure_access_log_list(engine, policy: Policy, patients: list[str], calls: int, warmup: int,
                            seed: int) -> dict[str, tuple[list[float], list[float]]]:
    rng = random.Random(seed)
    results = {}
    for label, dated in (("access-log.list", False), ("access-log.list from/to a year", True)):
        envelopes = access_log_envelopes([rng.choice(patients) for _ in range(calls + warmup)], rng, dated)
        results[label] = timed_queries(engine, policy, envelopes, warmup)
    return results


def reads_for_care(rows: list[tuple]) -> list[Envelope]:
    return [Envelope(routing_key="certificate.get-for-care", body=json.dumps(
                {"certificate_id": cid, "care_giver_id": giver, "accessed_by": READER}).encode(),
                message_id=str(uuid.uuid4()), reply_to="amq.rabbitmq.reply-to", content_type="application/json")
            for cid, _pid, giver, _unit in rows]


def read_for_care_committed(engine, policy: Policy, envelopes: list[Envelope], per_transaction: int) -> float:
    """Mean seconds per message, `per_transaction` messages per committed transaction (as the loop runs a batch)."""
    started = time.perf_counter()
    for first in range(0, len(envelopes), per_transaction):
        with SqlUnitOfWork(engine) as uow:
            for envelope in envelopes[first:first + per_transaction]:
                processed = process(parse(envelope, policy), uow, policy)
                assert processed.reply is not None and processed.reply.result.value == "OK", processed.reply
                processed.reply.model_dump_json()
            uow.commit()
    return (time.perf_counter() - started) / len(envelopes)


def measure_log_cost(engine, policy: Policy, rows: list[tuple], calls: int, batch: int, runs: int,
                     seed: int) -> dict[int, tuple[list[float], list[float]]]:
    """{messages per transaction: (seconds per message with the log, without it), one of each per run}. The
    runs alternate, so that a slower moment of a shared machine hits both."""
    from consumers import queries

    rng = random.Random(seed)
    logged = queries.record
    results: dict[int, tuple[list[float], list[float]]] = {}
    for per in (1, batch):
        with_log: list[float] = []
        without: list[float] = []
        for _ in range(runs):
            for target in (with_log, without):
                queries.record = logged if target is with_log else (lambda *args, **kwargs: None)
                envelopes = reads_for_care([rng.choice(rows) for _ in range(calls)])
                try:
                    read_for_care_committed(engine, policy, envelopes[:max(1, calls // 10)], per)  # warm-up
                    target.append(read_for_care_committed(engine, policy, envelopes, per))
                finally:
                    queries.record = logged
        results[per] = (with_log, without)
    return results


def print_log_cost(results: dict[int, tuple[list[float], list[float]]]) -> None:
    print(f"\n{'certificate.get-for-care, committed':<34}{'with log':>10}{'without':>10}{'added':>9}{'ratio':>8}"
          f"  (ms per message, median of {len(next(iter(results.values()))[0])} runs)")
    for per, (with_log, without) in results.items():
        a, b = statistics.median(with_log), statistics.median(without)
        print(f"{f'{per} message(s) per transaction':<34}{ms(a):>10}{ms(b):>10}{ms(a - b):>9}{a / b:>8.2f}"
              f"  runs with: {' '.join(ms(x).strip() for x in with_log)}; without: "
              f"{' '.join(ms(x).strip() for x in without)}")


def registration_envelopes(n: int, patients: list[str], run: str, rng: random.Random) -> list[Envelope]:
    types = [t for t in TYPES if t not in ("db", "doi")]
    zone = dt.timezone(dt.timedelta(hours=1))
    out = []
    for i in range(n):
        g, u = rng.randrange(CARE_GIVERS), rng.randrange(UNITS_PER_GIVER)
        signed = dt.datetime(2026, 1, 1, tzinfo=zone) + dt.timedelta(seconds=rng.randrange(300 * 86400))
        body = {"certificate": certificate_json(f"bench-reg-{run}-{i}", rng.choice(types), rng.choice(patients),
                                                signed, g, u, rng)}
        out.append(Envelope(routing_key="certificate.register", body=json.dumps(body, ensure_ascii=False).encode(),
                            message_id=f"bench-reg-{run}-{i}", content_type="application/json"))
    return out


def register_one_per_transaction(engine, policy: Policy, envelopes: list[Envelope]) -> tuple[float, list[float]]:
    timings = []
    started = time.perf_counter()
    for envelope in envelopes:
        t0 = time.perf_counter()
        parsed = parse(envelope, policy)
        with SqlUnitOfWork(engine) as uow:
            processed = process(parsed, uow, policy)
            uow.commit()
        timings.append(time.perf_counter() - t0)
        assert processed.reply is not None and processed.reply.result.value == "OK", processed.reply
    return time.perf_counter() - started, timings


def register_batched(engine, policy: Policy, envelopes: list[Envelope], batch: int,
                     savepoints: bool = True) -> tuple[float, list[float]]:
    """As the message loop does it: one transaction per batch, the batch's look-ups warmed up in one query (when
    the unit of work offers `warm`), each message in a savepoint of its own (`savepoints`) or not (the loop's
    optimistic first try, which falls back to savepoints only when a message of the batch fails), one commit."""
    timings = []
    started = time.perf_counter()
    for first in range(0, len(envelopes), batch):
        t0 = time.perf_counter()
        with SqlUnitOfWork(engine) as uow:
            parsed = [parse(envelope, policy) for envelope in envelopes[first:first + batch]]
            if hasattr(uow, "warm"):
                uow.warm([p.message_id for p in parsed], [subject(p) for p in parsed])
            for message in parsed:
                if savepoints:
                    with uow.savepoint():
                        processed = process(message, uow, policy)
                else:
                    processed = process(message, uow, policy)
                assert processed.reply is not None and processed.reply.result.value == "OK", processed.reply
            if hasattr(uow, "flush"):
                uow.flush()
            uow.commit()
        timings.append(time.perf_counter() - t0)
    return time.perf_counter() - started, timings


def remove_registered(conn: psycopg.Connection) -> None:
    """Back to the data as loaded (the load writes no inbox, outbox, tombstone or progress rows)."""
    conn.execute("DELETE FROM certificates WHERE id LIKE 'bench-reg-%'")
    conn.execute("TRUNCATE inbox, outbox, tombstones, bulk_progress")
    conn.execute("DELETE FROM access_log WHERE message_id NOT LIKE 'bench-log-%'")
    conn.commit()


# --- output -------------------------------------------------------------------------------------------------------
def _load() -> str:
    """1, 5 and 15 minute load averages: on a shared machine other processes' CPU shows up in the tail latency."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f}"


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def print_queries(results: dict, target_ms: float) -> bool:
    print(f"\n{'query (parse+process+reply JSON)':<34}{'calls':>7}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
          f"{'max ms':>9}{'mean ms':>9}{'cpu ms':>8}  p99 <= {target_ms:g} ms")
    good = True
    for kind, (timings, cpu) in results.items():
        p99 = pct(timings, 99)
        good &= p99 * 1000 <= target_ms
        print(f"{kind:<34}{len(timings):>7}{ms(pct(timings, 50)):>9}{ms(pct(timings, 90)):>9}{ms(p99):>9}"
              f"{ms(max(timings)):>9}{ms(statistics.fmean(timings)):>9}{ms(statistics.fmean(cpu)):>8}"
              f"  {'yes' if p99 * 1000 <= target_ms else 'NO'}")
    print("    (cpu ms: mean CPU time of this process per call; the rest of the wall time is waiting)")
    return good


def print_registrations(rows: list[tuple[str, int, float, list[float], int]]) -> None:
    print(f"\n{'certificate.register (through UoW)':<34}{'certs':>7}{'seconds':>9}{'certs/s':>9}"
          f"{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}  per transaction")
    for label, n, seconds, timings, per in rows:
        print(f"{label:<34}{n:>7}{seconds:>9.2f}{n / seconds:>9.0f}{ms(pct(timings, 50)):>9}"
              f"{ms(pct(timings, 99)):>9}{ms(max(timings)):>9}  {per} message{'s' if per > 1 else ''}")


HUGE = 10_000_000  # only with --huge: loading it takes long and needs several GB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL",
                                                                 "postgresql://postgres@127.0.0.1:5432/postgres"),
                        help="a server where the benchmark may CREATE DATABASE (from $DATABASE_URL when set)")
    parser.add_argument("--database", default="intyg_bench",
                        help="database to create, load and measure (one per size: <name>_<N>)")
    parser.add_argument("--certificates", type=int, nargs="+", default=[100_000, 1_000_000],
                        help="sizes to measure, each in a database of its own; the query p99s side by side")
    parser.add_argument("--huge", action="store_true", help=f"also {HUGE:,} certificates (not in CI)")
    parser.add_argument("--patients-per-certificate", type=float, default=0.2,
                        help="patients = certificates x this")
    parser.add_argument("--reuse", action="store_true", help="measure on the data already loaded (load if empty)")
    parser.add_argument("--calls", type=int, default=5000, help="measured calls per query")
    parser.add_argument("--warmup", type=int, default=500, help="unmeasured calls per query first")
    parser.add_argument("--registrations", type=int, default=20_000,
                        help="certificates registered per mode (at the largest size only)")
    parser.add_argument("--batch", type=int, default=100, help="messages per transaction in the batched mode")
    parser.add_argument("--target-ms", type=float, default=5.0, help="p99 target per query")
    parser.add_argument("--seed", type=int, default=20261125)
    parser.add_argument("--skip-registrations", action="store_true")
    parser.add_argument("--access-log-entries", type=int, default=1_000_000,
                        help="access log entries to load (10000000 for the contract's figure)")
    parser.add_argument("--access-log-runs", type=int, default=3, help="runs of the log's cost (median shown)")
    parser.add_argument("--skip-access-log", action="store_true")
    args = parser.parse_args(argv)

    sizes = sorted(set(args.certificates) | ({HUGE} if args.huge else set()))
    server = make_url(args.database_url).set(drivername="postgresql")
    with psycopg.connect(server.render_as_string(hide_password=False), autocommit=True) as admin:
        version = admin.execute("SHOW server_version").fetchone()[0]
    print(f"PostgreSQL {version}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, sizes "
          f"{', '.join(f'{n:,}' for n in sizes)}")
    by_size: dict[int, dict] = {}
    good = True
    for n in sizes:
        print(f"\n=== {n:,} certificates ===")
        results = measure_size(args, server, n, registrations=not args.skip_registrations and n == sizes[-1],
                               access_log=not args.skip_access_log and n == sizes[-1])
        if results is None:
            return 1
        by_size[n] = results
        good &= print_queries(results, args.target_ms)
    if len(by_size) > 1:
        print_side_by_side(by_size, args.target_ms)
    print(f"load average at the end: {_load()}")
    return 0 if good else 2


def print_side_by_side(by_size: dict[int, dict], target_ms: float) -> None:
    sizes = sorted(by_size)
    print(f"\nquery p99 (ms) by number of certificates, target <= {target_ms:g} ms")
    print(f"{'query':<34}" + "".join(f"{n:>14,}" for n in sizes))
    for kind in by_size[sizes[0]]:
        print(f"{kind:<34}" + "".join(f"{ms(pct(by_size[n][kind][0], 99)):>14}" for n in sizes))


def measure_size(args: argparse.Namespace, server, n_certificates: int, *, registrations: bool,
                 access_log: bool) -> dict | None:
    """Load (or reuse) a database of `n_certificates` and measure the queries (and the registrations, and the
    access log); returns the query timings by kind."""
    database = f"{args.database}_{n_certificates}"
    n_patients = max(1, int(n_certificates * args.patients_per_certificate))
    url = server.set(database=database).render_as_string(hide_password=False)
    with psycopg.connect(server.render_as_string(hide_password=False), autocommit=True) as admin:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if not exists:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    migrate.upgrade(url)

    with psycopg.connect(url) as conn:
        present = _count(conn, "certificates")
        if args.reuse and present:
            remove_registered(conn)
            print(f"reusing the loaded data of {database} ({present:,} certificates)")
        else:
            print(f"loading {n_certificates:,} certificates for {n_patients:,} patients into {database} ...",
                  flush=True)
            started = time.perf_counter()
            stats = load(conn, n_certificates, n_patients, args.seed)
            loaded = time.perf_counter() - started
            print(f"loaded in {loaded:.1f} s ({n_certificates / loaded:,.0f} certificates/s): "
                  f"{stats['statuses']:,} statuses, {stats['archived']:,} archived, {stats['sent']:,} sent, "
                  f"{stats['revoked']:,} revoked, {stats['citizen_only']:,} without care copy")
            conn.autocommit = True
            started = time.perf_counter()
            conn.execute("VACUUM ANALYZE")
            print(f"VACUUM ANALYZE in {time.perf_counter() - started:.1f} s")
            conn.autocommit = False
        counts = {t: _count(conn, t) for t in ("certificates", "certificate_statuses", "consents")}
        size = conn.execute("SELECT pg_size_pretty(pg_database_size(current_database()))").fetchone()[0]
        print(f"data: {counts['certificates']:,} certificates, {counts['certificate_statuses']:,} statuses, "
              f"{counts['consents']:,} patients with a consent record; database size {size}")
        rows = sample(conn, max(20_000, args.calls), args.seed)
        consented = [r[0] for r in conn.execute("SELECT patient_id FROM consents WHERE given LIMIT 50000")]
    if not rows:
        print("no certificates to measure", file=sys.stderr)
        return None

    settings = Settings(database_url=url)
    policy = Policy(catalogue=settings.catalogue, max_body_bytes=settings.max_body_bytes)
    engine = make_engine(url)  # the service's own engine settings (pool, pre-ping, timeouts)
    try:
        print(f"load average before the queries: {_load()}")
        results = measure_queries(engine, policy, rows, args.calls, args.warmup, args.seed)
        if registrations:
            rng = random.Random(args.seed + 1)
            run = uuid.uuid4().hex[:8]
            one = registration_envelopes(args.registrations, consented, run + "a", rng)
            many = registration_envelopes(args.registrations, consented, run + "b", rng)
            optimistic = registration_envelopes(args.registrations, consented, run + "c", rng)
            register_one_per_transaction(engine, policy, registration_envelopes(200, consented, run + "w", rng))
            seconds_one, timings_one = register_one_per_transaction(engine, policy, one)
            seconds_many, timings_many = register_batched(engine, policy, many, args.batch)
            seconds_opt, timings_opt = register_batched(engine, policy, optimistic, args.batch, savepoints=False)
            print_registrations([
                ("(a) one message per transaction", len(one), seconds_one, timings_one, 1),
                (f"(b) {args.batch} per transaction, savepoints", len(many), seconds_many, timings_many, args.batch),
                (f"(c) {args.batch} per transaction, none", len(optimistic), seconds_opt, timings_opt, args.batch),
            ])
            print("    (p50/p99/max of (b) and (c) are per transaction of the batch; (c) is the message loop's "
                  "first try, without savepoints)")
            with psycopg.connect(url) as conn:
                remove_registered(conn)
        if access_log:
            with psycopg.connect(url) as conn:
                present = _count(conn, "access_log")
                if not (args.reuse and present >= args.access_log_entries):
                    print(f"\nloading {args.access_log_entries:,} access log entries ...", flush=True)
                    started = time.perf_counter()
                    load_access_log(conn, args.access_log_entries, args.seed)
                    print(f"loaded in {time.perf_counter() - started:.1f} s", flush=True)
                entries = _count(conn, "access_log")
                size = conn.execute("SELECT pg_size_pretty(pg_total_relation_size('access_log'))").fetchone()[0]
                logged = [r[0] for r in conn.execute("SELECT DISTINCT patient_id FROM access_log "
                                                     "TABLESAMPLE SYSTEM (1) LIMIT 50000")] or [
                    r[0] for r in conn.execute("SELECT DISTINCT patient_id FROM access_log LIMIT 50000")]
            print(f"access log: {entries:,} entries, {size} with indexes; load average {_load()}")
            results.update(measure_access_log_list(engine, policy, logged, args.calls, args.warmup, args.seed))
            print_log_cost(measure_log_cost(engine, policy, rows, max(500, args.calls // 5), args.batch,
                                            args.access_log_runs, args.seed))
    finally:
        engine.dispose()
    return results


if __name__ == "__main__":
    sys.exit(main())
