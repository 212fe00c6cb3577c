"""Forged `x-intyg-*` headers with roles enforced (CONTRACT v1.1 §2, §8; issue 6 #2): real broker users, so the
broker verifies each publisher's `user_id`, and the service must act as that user, never as anyone a client's header
names, on a fresh message, on its own retry copies and on an operator's replay of a dead letter. The service's
retry bookkeeping (`x-intyg-attempts`, `x-intyg-first-attempt-at`, `x-intyg-original-routing-key`) cannot be
forged either.

Care user A may act for care giver CG only, care user B for CG2 only."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

try:
    from tests.e2e.common import BY, CG, CG2, CU2, certificate, check_reply, grant_users, new_broker_users, revoke_body
    from tests.e2e.harness import Wire, dlq_cli, new_id, new_patient
except ImportError:  # tests/ itself on sys.path
    from e2e.common import BY, CG, CG2, CU2, certificate, check_reply, grant_users, new_broker_users, revoke_body
    from e2e.harness import Wire, dlq_cli, new_id, new_patient

from contracts.topology import H_ORIGINAL_USER_ID

pytestmark = pytest.mark.integration

ROLES = ("care_a", "care_b", "portal", "operator")
REFUSED = {("ERROR", "FORBIDDEN"), ("ERROR", "NOT_FOUND")}  # what care A gets for care giver B's certificate


@dataclass
class World:
    users: dict[str, str]  # role -> broker user
    urls: dict[str, str]
    wires: dict[str, Wire]  # role -> that user's connection
    observer: Wire  # taps intyg.events and looks at queues
    revoke_wait_s: float

    def send(self, who: str, routing_key: str, body: dict, **properties) -> str:
        return self.wires[who].send(routing_key, body, user_id=self.users[who], **properties)

    def check(self, who: str, routing_key: str, body: dict, result: str = "OK", code: str | None = None,
              **properties) -> dict:
        return check_reply(self.wires[who], self.send(who, routing_key, body, **properties), result, code)

    def register_for_b(self, cid: str, patient: str) -> None:
        self.check("care_b", "certificate.register",
                   {"certificate": certificate(cid, patient, care_giver=CG2, care_unit=CU2)})


@pytest.fixture(scope="module")
def accounts(broker_users) -> dict[str, tuple[str, str]]:
    """The module's broker users (creating users is slow; each test grants them its own vhost)."""
    return new_broker_users(broker_users, "forged", ROLES)


@pytest.fixture
def world(launch, stack, accounts) -> Iterator[Callable[..., World]]:
    opened: list[Wire] = []

    def start(*, revoke_wait_s: float) -> World:
        users, urls = grant_users(stack, accounts)
        launch(ENFORCE_ROLES="true", REVOKE_WAIT_S=revoke_wait_s, RETRY_DELAYS_S=[0.3, 0.6],
               ROLES={users["care_a"]: {"role": "care", "care_giver_ids": [CG]},
                      users["care_b"]: {"role": "care", "care_giver_ids": [CG2]},
                      users["portal"]: {"role": "citizen-portal"},
                      users["operator"]: {"role": "operator"}})
        wires = {role: Wire(urls[role], tap_events=False) for role in ROLES}
        observer = Wire(stack.amqp_url)
        opened.extend([*wires.values(), observer])
        return World(users, urls, wires, observer, revoke_wait_s)

    yield start
    for wire in opened:
        wire.close()


def _revoked(stack, cid: str) -> bool:
    return stack.db.scalar("select revoked_at is not null from certificates where id = %s", cid)


def test_a_forged_original_user_header_never_makes_a_waiting_revoke_act_as_the_operator(world, stack):
    w = world(revoke_wait_s=4)
    cid, p = new_id(), new_patient()
    revoke = w.send("care_a", "certificate.revoke", revoke_body(cid, p),
                    headers={H_ORIGINAL_USER_ID: w.users["operator"]})
    w.wires["care_a"].pump(0.8)  # it overtook its register and waits, through the service's retry copies
    assert revoke not in w.wires["care_a"].replies, w.wires["care_a"].replies[revoke][0].body
    w.register_for_b(cid, p)  # care giver B's certificate, with the id care A's revoke waits for

    reply = w.wires["care_a"].reply(revoke, timeout=w.revoke_wait_s + 15)
    assert (reply["result"], reply["code"]) in REFUSED, \
        f"the retried revoke must act as care user A (FORBIDDEN or NOT_FOUND): {reply}"
    assert not _revoked(stack, cid)
    w.observer.pump(0.5)
    assert not w.observer.events_where("certificate.revoked", certificate_id=cid)


def test_a_forged_original_user_header_on_a_fresh_message_is_ignored(world, stack):
    w = world(revoke_wait_s=2)
    cid, p = new_id(), new_patient()
    w.register_for_b(cid, p)
    read_b = {"certificate_id": cid, "care_giver_id": CG2, **BY}
    # a care user naming the operator, or the care user of the other care giver, is still only itself
    w.check("care_a", "certificate.get-for-care", read_b, "ERROR", "FORBIDDEN",
            headers={H_ORIGINAL_USER_ID: w.users["operator"]})
    w.check("care_a", "certificate.get-for-care", read_b, "ERROR", "FORBIDDEN",
            headers={H_ORIGINAL_USER_ID: w.users["care_b"]})
    # the citizen portal naming a care user may still not register
    w.check("portal", "certificate.register", {"certificate": certificate(new_id(), p)}, "ERROR", "FORBIDDEN",
            headers={H_ORIGINAL_USER_ID: w.users["care_a"]})
    # and the header does not make the operator's own message act as somebody else either
    w.check("operator", "certificate.get-for-care", read_b, headers={H_ORIGINAL_USER_ID: w.users["portal"]})
    assert stack.db.scalar("select count(*) from certificates") == 1


def test_a_replayed_dead_letter_acts_as_its_broker_verified_sender_not_as_its_forged_header(world, stack):
    w = world(revoke_wait_s=1)
    cid, p = new_id(), new_patient()
    revoke = w.send("care_a", "certificate.revoke", revoke_body(cid, p),
                    headers={H_ORIGINAL_USER_ID: w.users["operator"]})
    check_reply(w.wires["care_a"], revoke, "ERROR", "NOT_FOUND", timeout=w.revoke_wait_s + 15)
    w.observer.pump_until(lambda: w.observer.ready("intyg.status.dlq") == 1, 10, "the dead letter")
    shown = dlq_cli(w.urls["operator"], "show", "intyg.status", "--json")
    assert shown.returncode == 0, shown.stderr
    [letter] = json.loads(shown.stdout)

    w.register_for_b(cid, p)
    replayed = dlq_cli(w.urls["operator"], "replay", "intyg.status", "--id", revoke)
    assert replayed.returncode == 0 and "replayed 1 of 1" in replayed.stdout, replayed.stdout + replayed.stderr
    replies = w.wires["care_a"].replies
    w.wires["care_a"].pump_until(lambda: len(replies[revoke]) >= 2, w.revoke_wait_s + 15, "the replay's reply")
    again = replies[revoke][1].body
    assert (again["result"], again["code"]) in REFUSED, \
        f"the operator's replay must act as care user A (FORBIDDEN or NOT_FOUND): {again}"
    assert not _revoked(stack, cid)
    assert letter["headers"].get(H_ORIGINAL_USER_ID) != w.users["operator"], \
        f"the dead letter kept the client's {H_ORIGINAL_USER_ID}: {letter['headers']}"


def test_forged_retry_bookkeeping_neither_dead_letters_a_message_early_nor_reroutes_it(world, stack):
    w = world(revoke_wait_s=5)
    cid, p = new_id(), new_patient()
    revoke = w.send("care_a", "certificate.revoke", revoke_body(cid, p), headers={
        "x-intyg-attempts": 99, "x-intyg-first-attempt-at": "2000-01-01T00:00:00Z",
        "x-intyg-original-routing-key": "certificate.remove-care-copy", "x-intyg-error-code": "NOT_FOUND",
        "x-intyg-dead-lettered-at": "2000-01-01T00:00:00Z"})
    w.wires["care_a"].pump(1.0)  # several retry rounds
    assert revoke not in w.wires["care_a"].replies, w.wires["care_a"].replies[revoke][0].body
    assert w.observer.ready("intyg.status.dlq") == 0
    w.check("care_a", "certificate.register", {"certificate": certificate(cid, p)})

    check_reply(w.wires["care_a"], revoke, "OK", timeout=15)  # handled as the revoke it is, in its window
    assert _revoked(stack, cid)
    w.observer.wait_events("certificate.revoked", certificate_id=cid)
    w.observer.pump(0.5)
    assert len(w.wires["care_a"].replies[revoke]) == 1
    assert w.observer.ready("intyg.status.dlq") == 0
