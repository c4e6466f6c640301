"""One settings object, read from the environment once and passed in explicitly.

Every default serves the embedded mode: with nothing configured, PostgreSQL comes from the
``pgserver`` package in ``BILLING_DATA_DIR/pg`` and the queue is kombu's filesystem transport in
``BILLING_DATA_DIR/queue``. Setting ``BILLING_DATABASE_URL`` and ``BILLING_BROKER_URL`` points the
same code at a real PostgreSQL and RabbitMQ.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from billing.errors import ConfigError

EMBEDDED = "embedded"

# The deploy examples (deploy/*.env.example, deploy/k8s/secret.example.yaml) hold this
# placeholder in every secret; a deployment that forgot to replace one must not start.
PLACEHOLDER = "CHANGE_ME"
# The settings that carry credentials: passwords inside the two URLs, the Stripe key, the webhook
# signing secret(s), the gateway's bearer token.
SECRET_VARIABLES = (
    "BILLING_DATABASE_URL",
    "BILLING_BROKER_URL",
    "BILLING_STRIPE_API_KEY",
    "BILLING_STRIPE_WEBHOOK_SECRET",
    "BILLING_AUTHORIZE_TOKEN",
)


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _rate(env: Mapping[str, str], name: str, default: Decimal) -> Decimal:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise ConfigError(f"{name} must be a decimal such as 0.05, got {raw!r}") from None
    if not value.is_finite() or not 0 <= value < 1:
        raise ConfigError(f"{name} must be >= 0 and < 1, got {raw!r}")
    return value


def _charge_cap(env: Mapping[str, str], name: str, default: Decimal | None) -> Decimal | None:
    """A per-event charge cap in USD: a non-negative decimal; ``0`` turns the cap off (None)."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = Decimal(raw.strip())
    except InvalidOperation:
        raise ConfigError(f"{name} must be an amount in USD such as 1000, got {raw!r}") from None
    if not value.is_finite() or value < 0:
        raise ConfigError(f"{name} must be an amount in USD >= 0 (0 = no cap), got {raw!r}")
    return value if value > 0 else None


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    raw = env.get(name) or default
    if raw not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {raw!r}")
    return raw


def _deploy_settings(env: Mapping[str, str], base: Settings) -> dict[str, Any]:
    partitions = _int(env, "BILLING_USAGE_PARTITIONS", base.usage_partitions)
    consume: list[int] = []
    for part in env.get("BILLING_USAGE_CONSUME_PARTITIONS", "").split(","):
        if not part.strip():
            continue
        try:
            n = int(part)
        except ValueError:
            n = -1
        if not 0 <= n < partitions:
            raise ConfigError(
                f"BILLING_USAGE_CONSUME_PARTITIONS: {part.strip()!r} is not a partition number "
                f"0..{partitions - 1} (BILLING_USAGE_PARTITIONS={partitions})"
            )
        consume.append(n)
    return {
        "usage_queue_type": _choice(
            env, "BILLING_USAGE_QUEUE_TYPE", base.usage_queue_type, ("classic", "quorum")
        ),
        "usage_queue_max_length": _int(env, "BILLING_USAGE_QUEUE_MAX_LENGTH", 0, minimum=0),
        "usage_dead_letter_exchange": env.get("BILLING_USAGE_DEAD_LETTER_EXCHANGE", ""),
        "usage_delivery_limit": _int(env, "BILLING_USAGE_DELIVERY_LIMIT", 0, minimum=0),
        "usage_partitions": partitions,
        "usage_consume_partitions": tuple(sorted(set(consume))),
        "publish_backpressure_timeout_s": _int(
            env, "BILLING_PUBLISH_BACKPRESSURE_TIMEOUT_S", 30, minimum=0
        ),
        "publish_envelope_size": _int(
            env, "BILLING_PUBLISH_ENVELOPE_SIZE", base.publish_envelope_size
        ),
        "publish_linger_ms": _int(
            env, "BILLING_PUBLISH_LINGER_MS", base.publish_linger_ms, minimum=0
        ),
        "partition_months_ahead": _int(env, "BILLING_PARTITION_MONTHS_AHEAD", 3),
        "payload_retention_days": _int(env, "BILLING_PAYLOAD_RETENTION_DAYS", 90),
        "db_pool_size": _int(env, "BILLING_DB_POOL_SIZE", base.db_pool_size),
    }


def _no_placeholders(env: Mapping[str, str]) -> None:
    """Refuse secrets still holding the deploy examples' placeholder, naming the variables only
    (a value may be a URL with a real user or host, or half a real secret)."""
    left = [name for name in SECRET_VARIABLES if PLACEHOLDER in env.get(name, "")]
    if left:
        raise ConfigError(
            f"{', '.join(left)} still {'holds' if len(left) == 1 else 'hold'} the {PLACEHOLDER} "
            "placeholder of the deploy examples (values not repeated here): set the real secret"
        )


def _database_url(url: str) -> str:
    """``url``, checked here so that libpq never has to say what is wrong with it: its messages
    quote the offending text (a password with a bad %-escape, or cut at an unescaped ``@``)."""
    if url == EMBEDDED:
        return url
    try:
        parts = conninfo_to_dict(url)
    except psycopg.Error:
        parts = {"host": "@"}
    if "@" in str(parts.get("host") or ""):
        raise ConfigError(
            "BILLING_DATABASE_URL is not a valid PostgreSQL URL or conninfo (not repeated here: "
            "it may hold a password); percent-encode @, %, / and : in the user and password"
        )
    return url


@dataclass(frozen=True)
class Settings:
    """Everything the code reads from the environment, in one place."""

    data_dir: Path = Path(".billing")
    # URLs carry passwords: kept out of repr() too, like the secrets below.
    database_url: str = field(default=EMBEDDED, repr=False)
    broker_url: str = field(default=EMBEDDED, repr=False)
    usage_exchange: str = "billing.usage"
    usage_queue: str = "billing.usage"
    wallet_events_exchange: str = "billing.wallet-events"
    tasks_queue: str = "billing.tasks"
    batch_size: int = 2000  # messages
    batch_events: int = 5000  # events (an envelope carries many)
    # The longest the first message of a batch waits for more. With messages arriving faster than
    # the idle rule below closes a batch (single events near capacity), every batch waits this
    # long before it is recorded: 50 ms rather than 200 halved the median publish-to-commit time
    # of single events at half rate, for a drain a median 1.2% slower (docs/performance.md,
    # seventh session).
    batch_timeout_ms: int = 50
    # A batch also closes when no message came for this long: the queue is drained, so waiting
    # for more only adds latency (with a backlog, batches still fill to their bounds).
    batch_idle_ms: int = 5
    prefetch: int = 4000
    max_message_bytes: int = 1_048_576
    max_clock_skew: timedelta = timedelta(minutes=5)
    # The most one usage event may be priced at (USD); None = no cap. An event over it is parked
    # as ``charge_over_cap`` instead of recorded: counts go up to 10**12 tokens, so one event of
    # a buggy or compromised gateway could otherwise take millions from a wallet at once.
    max_event_charge: Decimal | None = Decimal(1000)
    usage_consumer_enabled: bool = True
    # the usage consumer reads its AMQP socket 64 KiB at a time (workers/amqp_reads.py)
    amqp_read_ahead: bool = True
    # Worker HTTP: /metrics, /healthz, /readyz (billing/health.py); 0 = off.
    metrics_port: int = 9808
    # Stripe top-ups (billing/topups.py). Secrets are kept out of repr() so they never reach logs.
    stripe_api_key: str = field(default="", repr=False)
    stripe_webhook_secret: tuple[str, ...] = field(default=(), repr=False)
    stripe_api_base: str = ""
    topup_fee_rate: Decimal = Decimal("0.05")
    webhook_tolerance_s: int = 300
    webhook_max_body_bytes: int = 262_144
    # Exports (billing/exports): where the export task writes, and its Celery queue.
    exports_dir: Path = Path(".billing/exports")
    exports_queue: str = "billing.exports"
    # Spend controls (billing/holds.py): how long an unsettled hold reserves credit, and the
    # bearer token the gateway must send to POST /v1/authorize ("" = no token required).
    hold_ttl: timedelta = timedelta(minutes=15)
    authorize_token: str = field(default="", repr=False)
    sql_dir: Path = field(default_factory=lambda: Path(__file__).resolve().parent.parent / "sql")
    # Deployment (issue 8, docs/operations.md): usage queue topology, back-pressure, partitions of
    # the queue and of usage_events, payload retention, pool size. The filesystem transport of
    # the embedded mode ignores the queue arguments.
    usage_queue_type: str = "classic"  # or "quorum" (production)
    usage_queue_max_length: int = 0  # messages; 0 = unbounded. Full: publishes are refused
    usage_dead_letter_exchange: str = ""  # "" = none
    usage_delivery_limit: int = 0  # quorum queues: dead-letter after N deliveries; 0 = none
    usage_partitions: int = 1  # >1: N queues, by CRC-32 of the account id mod N
    usage_consume_partitions: tuple[int, ...] = ()  # partitions this worker consumes; () = all
    publish_backpressure_timeout_s: int = 30  # keep retrying a refused publish this long
    # a gateway's buffered publisher (broker.BufferedUsagePublisher): envelopes of up to this many
    # events of one partition, published at the latest this long after their first event
    publish_envelope_size: int = 100
    publish_linger_ms: int = 50
    partition_months_ahead: int = 3
    payload_retention_days: int = 90
    db_pool_size: int = 2  # per worker process: usage consumer + outbox relay

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        _no_placeholders(env)
        data_dir = Path(env.get("BILLING_DATA_DIR", ".billing")).resolve()
        base = cls()
        return replace(
            base,
            data_dir=data_dir,
            database_url=_database_url(env.get("BILLING_DATABASE_URL", "") or EMBEDDED),
            broker_url=env.get("BILLING_BROKER_URL", "") or EMBEDDED,
            usage_exchange=env.get("BILLING_USAGE_EXCHANGE", base.usage_exchange),
            usage_queue=env.get("BILLING_USAGE_QUEUE", base.usage_queue),
            wallet_events_exchange=env.get(
                "BILLING_WALLET_EVENTS_EXCHANGE", base.wallet_events_exchange
            ),
            tasks_queue=env.get("BILLING_TASKS_QUEUE", base.tasks_queue),
            batch_size=_int(env, "BILLING_BATCH_SIZE", base.batch_size),
            batch_events=_int(env, "BILLING_BATCH_EVENTS", base.batch_events),
            batch_timeout_ms=_int(env, "BILLING_BATCH_TIMEOUT_MS", base.batch_timeout_ms),
            batch_idle_ms=_int(env, "BILLING_BATCH_IDLE_MS", base.batch_idle_ms),
            prefetch=_int(env, "BILLING_PREFETCH", base.prefetch),
            max_message_bytes=_int(env, "BILLING_MAX_MESSAGE_BYTES", base.max_message_bytes),
            max_clock_skew=timedelta(seconds=_int(env, "BILLING_MAX_CLOCK_SKEW_S", 300, minimum=0)),
            max_event_charge=_charge_cap(env, "BILLING_MAX_EVENT_CHARGE", base.max_event_charge),
            usage_consumer_enabled=env.get("BILLING_USAGE_CONSUMER", "1") not in ("0", "false"),
            amqp_read_ahead=env.get("BILLING_AMQP_READ_AHEAD", "1") not in ("0", "false"),
            metrics_port=_int(env, "BILLING_METRICS_PORT", base.metrics_port, minimum=0),
            stripe_api_key=env.get("BILLING_STRIPE_API_KEY", ""),
            stripe_webhook_secret=tuple(
                s.strip()
                for s in env.get("BILLING_STRIPE_WEBHOOK_SECRET", "").split(",")
                if s.strip()
            ),
            stripe_api_base=env.get("BILLING_STRIPE_API_BASE", ""),
            topup_fee_rate=_rate(env, "BILLING_TOPUP_FEE_RATE", base.topup_fee_rate),
            webhook_tolerance_s=_int(env, "BILLING_WEBHOOK_TOLERANCE_S", 300),
            webhook_max_body_bytes=_int(
                env, "BILLING_WEBHOOK_MAX_BODY_BYTES", base.webhook_max_body_bytes
            ),
            exports_dir=Path(env.get("BILLING_EXPORTS_DIR", "") or data_dir / "exports"),
            exports_queue=env.get("BILLING_EXPORTS_QUEUE", base.exports_queue),
            hold_ttl=timedelta(seconds=_int(env, "BILLING_HOLD_TTL_S", 900)),
            authorize_token=env.get("BILLING_AUTHORIZE_TOKEN", ""),
            sql_dir=Path(env["BILLING_SQL_DIR"]) if env.get("BILLING_SQL_DIR") else base.sql_dir,
            **_deploy_settings(env, base),
        )

    @property
    def embedded_database(self) -> bool:
        return self.database_url == EMBEDDED

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url == EMBEDDED

    @property
    def queue_dir(self) -> Path:
        return self.data_dir / "queue"

    @property
    def pg_dir(self) -> Path:
        return self.data_dir / "pg"
