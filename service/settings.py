"""Configuration from the environment (12-factor). `AMQP_URL` as RabbitMQ writes it (its path is the vhost),
`DATABASE_URL` as every PostgreSQL tool writes it; everything else has a default that works on a laptop."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from domain.model import Catalogue, Recipient

DEFAULT_TYPES = ("fk7263", "lisjp", "luse", "luae_na", "luae_fs", "ts-bas", "ts-diabetes", "tstrk1009",
                 "tstrk1062", "af00213", "af00251", "ag114", "ag7804", "db", "doi")


class RecipientSetting(BaseModel):
    id: str
    name: str
    certificate_types: list[str]
    trusted: bool = True
    active: bool = True


DEFAULT_RECIPIENTS = (
    RecipientSetting(id="FKASSA", name="Försäkringskassan",
                     certificate_types=["fk7263", "lisjp", "luse", "luae_na", "luae_fs"]),
    RecipientSetting(id="TRANSP", name="Transportstyrelsen",
                     certificate_types=["ts-bas", "ts-diabetes", "tstrk1009", "tstrk1062"]),
    RecipientSetting(id="AF", name="Arbetsförmedlingen", certificate_types=["af00213", "af00251"]),
    RecipientSetting(id="SKV", name="Skatteverket", certificate_types=["db"]),
    RecipientSetting(id="SOS", name="Socialstyrelsen", certificate_types=["doi"]),
)


def _seconds_or_iso(value: Any) -> Any:
    """`604800` (seconds) as well as ISO 8601 (`P7D`, `PT24H`)."""
    if isinstance(value, str) and value.strip().replace(".", "", 1).isdigit():
        return float(value)
    return value


Duration = Annotated[dt.timedelta, BeforeValidator(_seconds_or_iso)]

Role = Literal["care", "citizen-portal", "operator"]


class UserRole(BaseModel):
    role: Role
    care_giver_ids: list[str] | None = None  # a care user may be limited to some care givers


class Settings(BaseSettings):
    """Every setting can be given as an environment variable of the same name in capitals, e.g.
    `RECIPIENTS='[{"id": "FKASSA", ...}]'` or `ENFORCE_ROLES=true`."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", frozen=True)

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"  # or several nodes of a cluster, comma-separated
    # For amqps:// nodes (always verified): the CA bundle (default: the system's) and an optional client certificate.
    amqp_ca_file: str | None = None
    amqp_cert_file: str | None = None
    amqp_key_file: str | None = None
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    certificate_types: list[str] = Field(default_factory=lambda: list(DEFAULT_TYPES))
    recipients: list[RecipientSetting] = Field(default_factory=lambda: list(DEFAULT_RECIPIENTS))
    max_body_bytes: int = 4 * 1024 * 1024
    prefetch: int = 200
    batch_size: int = 100  # messages handled in one database transaction
    batch_wait_ms: float = 2.0  # how long a batch waits for more messages before it is handled
    retry_delays_s: list[float] = Field(default_factory=lambda: [1, 2, 5, 10, 30])
    revoke_wait_s: float = 300.0  # a revoke that overtakes its register waits this long
    bulk_batch_size: int = 500  # certificates per transaction when a care giver leaves
    relay_batch_size: int = 500
    relay_poll_s: float = 0.2
    relay_max_attempts: int = Field(default=10, ge=1)  # failed publishes of one outbox row before it is parked
    # How long a message_id is remembered (CONTRACT §8), and a published outbox row kept; ISO 8601 (P7D, PT24H)
    # or seconds. Housekeeping deletes what is older every `housekeeping_interval_s`.
    dedup_window: Duration = Field(default=dt.timedelta(days=7), gt=dt.timedelta(0))
    outbox_retention: Duration = Field(default=dt.timedelta(hours=24), ge=dt.timedelta(0))
    housekeeping_interval_s: float = Field(default=60.0, gt=0)
    enforce_roles: bool = False
    roles: dict[str, UserRole] = Field(default_factory=dict)  # broker user -> role
    log_level: str = "INFO"
    # Salt for the patient hash in log lines; set one secret value for every instance to correlate their logs.
    # Empty: a random salt per process (hashes then only correlate within one process's lifetime).
    log_salt: str = ""
    # Consumer threads (each with its own connection and transaction) on the queues where order does not matter,
    # intyg.registration and intyg.query; the others always have one, so that commands keep their order.
    parallel_consumers: int = Field(default=1, ge=1, le=16)
    # CONTRACT §9: care messages must say who accesses (off only while v1 clients migrate), and how long the
    # access log keeps its entries (an ISO 8601 duration such as P3653D, or seconds).
    access_log_required: bool = True
    access_log_retention: dt.timedelta = dt.timedelta(days=3653)  # 10 years, leap days included
    # Consumer processes `serve` runs next to its relay process: the first consumes every queue, the others only
    # intyg.registration and intyg.query (order-free), so that commands of the ordered queues keep their order.
    # Two by default: one consumer waits on PostgreSQL and the broker most of its time, and a second one uses the
    # other core meanwhile (benchmarks/throughput.py, issue 10: +24 % registrations/s on 2 cores).
    consumer_processes: int = Field(default=2, ge=1, le=16)
    reconnect_max_s: float = 30.0  # cap of the jittered exponential back-off when the broker is away
    # Key of the HMAC on the service's own retry and dead-letter bookkeeping (consumers.retry.Signer); every
    # instance must share it. Empty: derived from the service's broker credentials, which every instance shares.
    header_signing_key: str = ""
    # `/metrics`, `/healthz` and `/readyz` of `serve` (service.probes); 0 = none.
    metrics_port: int = Field(default=9464, ge=0, le=65535)

    @cached_property
    def catalogue(self) -> Catalogue:
        return Catalogue(
            certificate_types=frozenset(self.certificate_types),
            recipients={r.id: Recipient(r.id, r.name, frozenset(r.certificate_types), r.trusted, r.active)
                        for r in self.recipients},
        )

    @cached_property
    def signing_key(self) -> bytes:
        if self.header_signing_key:
            return self.header_signing_key.encode()
        from urllib.parse import urlsplit

        broker = urlsplit(self.amqp_url.split(",")[0])
        secret = f"{broker.username}:{broker.password}@{broker.path}"  # not the host: nodes differ
        return hashlib.sha256(b"intygstjanst bookkeeping\0" + secret.encode()).digest()

    def redacted(self) -> dict[str, object]:
        """What `intygstjanst config` prints: no passwords."""
        shown = json.loads(self.model_dump_json())
        shown["amqp_url"] = ",".join(_without_password(node) for node in shown["amqp_url"].split(","))
        shown["database_url"] = _without_password(shown["database_url"])
        for secret in ("log_salt", "header_signing_key"):
            if shown.get(secret):
                shown[secret] = "***"
        return shown


def _without_password(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
