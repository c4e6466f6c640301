"""Operator commands for the fleet's upkeep: ``billing partitions``, ``billing retention`` and
``billing broker`` (see docs/operations.md)."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from billing import broker, db
from billing.cli_common import console, handles_errors, settings_of
from billing.errors import ConfigError
from billing.partitions import ensure_partitions, list_partitions, purge_payloads
from billing.settings import EMBEDDED, PLACEHOLDER


@click.group()
def partitions() -> None:
    """Monthly partitions of usage_events."""


@partitions.command("ensure")
@click.option(
    "--months-ahead",
    type=click.IntRange(min=1),
    default=None,
    help="Default: BILLING_PARTITION_MONTHS_AHEAD.",
)
@click.pass_context
@handles_errors
def partitions_ensure(ctx: click.Context, months_ahead: int | None) -> None:
    """Create the partitions of this month and the next ones (idempotent)."""
    settings = settings_of(ctx)
    ahead = months_ahead or settings.partition_months_ahead
    with db.connect(settings) as conn:
        created = ensure_partitions(conn, db.queries(settings), datetime.now(UTC), ahead)
    console.print(
        f"created {len(created)} partition(s)" + (": " + ", ".join(created) if created else "")
    )


@partitions.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def partitions_list(ctx: click.Context, as_json: bool) -> None:
    """Every usage_events partition, its bounds, estimated rows and size."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        rows = list_partitions(conn, db.queries(settings))
    if as_json:
        click.echo(json.dumps([asdict(p) for p in rows], indent=2))
        return
    for p in rows:
        console.print(f"{p.name}  {p.bounds}  ~{p.rows_estimate} rows  {p.bytes} bytes")


@click.group()
def retention() -> None:
    """Retention of raw payloads (dead letters no longer parked, processed Stripe events)."""


@retention.command("run")
@click.option(
    "--days",
    type=click.IntRange(min=1),
    default=None,
    help="Keep payloads this many days. Default: BILLING_PAYLOAD_RETENTION_DAYS.",
)
@click.pass_context
@handles_errors
def retention_run(ctx: click.Context, days: int | None) -> None:
    """Remove raw payloads older than the retention period (ids, reasons, outcomes stay)."""
    settings = settings_of(ctx)
    with db.connect(settings) as conn:
        result = purge_payloads(
            conn, db.queries(settings), datetime.now(UTC), days or settings.payload_retention_days
        )
    console.print(
        f"purged payloads older than {result.before.isoformat()}: "
        f"{result.dead_letters} dead letter(s), {result.stripe_events} Stripe event(s)"
    )


@click.group("broker")
def broker_group() -> None:
    """The RabbitMQ topology of the usage queues."""


@broker_group.command("declare")
@click.pass_context
@handles_errors
def broker_declare(ctx: click.Context) -> None:
    """Declare the usage queue(s), dead-letter queue and wallet-events exchange (idempotent)."""
    settings = settings_of(ctx)
    with broker.connect(settings) as conn:
        broker.declare_topology(conn, settings)
    console.print("declared " + ", ".join(broker.usage_queue_names(settings)))


@broker_group.command("import-definitions")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--url", default="http://127.0.0.1:15672", show_default=True, help="Management API.")
@click.option(
    "--user", envvar="RABBITMQ_DEFAULT_USER", required=True, help="Env: RABBITMQ_DEFAULT_USER."
)
@click.option(
    "--password", envvar="RABBITMQ_DEFAULT_PASS", required=True, help="Env: RABBITMQ_DEFAULT_PASS."
)
@click.option("--wait", default=120, show_default=True, help="Seconds to wait for the API.")
@click.option(
    "--create-broker-user",
    is_flag=True,
    help="Also create the user of BILLING_BROKER_URL with its password and every permission on "
    "its vhost (a broker not booted with it as its default user, e.g. on Kubernetes).",
)
@click.pass_context
@handles_errors
def broker_import_definitions(
    ctx: click.Context,
    file: Path,
    url: str,
    user: str,
    password: str,
    wait: int,
    create_broker_user: bool,
) -> None:
    """Import a RabbitMQ definitions file (vhosts, exchanges, queues, bindings); idempotent."""
    if PLACEHOLDER in password:
        raise ConfigError(
            f"RABBITMQ_DEFAULT_PASS (--password) still holds the {PLACEHOLDER} placeholder of the "
            "deploy examples (not repeated here): set the real password"
        )
    broker_url = settings_of(ctx).broker_url if create_broker_user else ""
    if create_broker_user and broker_url == EMBEDDED:
        raise ConfigError("--create-broker-user: BILLING_BROKER_URL is not set")
    if broker_url:
        broker.broker_login(broker_url, user)  # refused before anything changes
    broker.import_definitions(url, user, password, file.read_bytes(), wait_s=wait)
    console.print(f"imported {file.name} into {url}")
    if broker_url:
        created = broker.ensure_user(url, user, password, broker_url, wait_s=wait)
        console.print(f"user {created} can log in with the password of BILLING_BROKER_URL")


@broker_group.command("assign")
@click.option("--workers", type=click.IntRange(min=1), required=True, help="Worker groups.")
@click.option(
    "--hours", type=click.IntRange(min=1), default=1, show_default=True, help="Traffic window."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@handles_errors
def broker_assign(ctx: click.Context, workers: int, hours: int, as_json: bool) -> None:
    """Split the usage partitions between worker groups by their recorded traffic.

    Prints each group's BILLING_USAGE_CONSUME_PARTITIONS and its share of the events recorded in
    the last --hours (docs/operations.md, "Partitioning by account").
    """
    settings = settings_of(ctx)
    n = settings.usage_partitions
    if n <= 1:
        raise click.UsageError("BILLING_USAGE_PARTITIONS is 1: the usage stream is not partitioned")
    since = datetime.now(UTC) - timedelta(hours=hours)
    with db.connect(settings) as conn:
        rows = conn.execute(db.queries(settings)["events_per_account_since"], {"since": since})
        per_partition = broker.events_per_partition(rows, n)
    groups = [
        (",".join(map(str, group)), sum(per_partition.get(j, 0) for j in group))
        for group in broker.assign_partitions(per_partition, n, workers)
    ]
    if as_json:
        workers_json = [
            {"worker": i, "BILLING_USAGE_CONSUME_PARTITIONS": consumed, "events": events}
            for i, (consumed, events) in enumerate(groups)
        ]
        out = {"partitions": n, "since": since.isoformat(), "workers": workers_json}
        click.echo(json.dumps(out))
        return
    total = sum(per_partition.values())
    for i, (consumed, events) in enumerate(groups):
        share = f"{events / total:.0%}" if total else "no traffic"
        click.echo(
            f"worker {i}: BILLING_USAGE_CONSUME_PARTITIONS={consumed}  ({events:,} events, {share})"
        )


@broker_group.command("depth")
@click.pass_context
@handles_errors
def broker_depth(ctx: click.Context) -> None:
    """Messages ready in the usage queue(s)."""
    settings = settings_of(ctx)
    with broker.connect(settings) as conn:
        click.echo(str(broker.queue_depth(conn, settings)))


@broker_group.command("replay-dead-letters")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many.")
@click.pass_context
@handles_errors
def broker_replay(ctx: click.Context, limit: int | None) -> None:
    """Move messages from the usage dead-letter queue back to the usage exchange.

    Safe to repeat: an event already recorded is not debited again.
    """
    settings = settings_of(ctx)
    with broker.connect(settings) as conn:
        moved = broker.shovel_dead_letters(conn, settings, limit)
    console.print(f"republished {moved} message(s)")


@click.command()
@click.option("--loglevel", default="INFO", show_default=True)
@click.option(
    "--schedule",
    type=click.Path(path_type=Path),
    default=None,
    help="Celery beat's schedule state file. Default: BILLING_DATA_DIR/celerybeat-schedule.",
)
@click.option(
    "--heartbeat-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Touched every few seconds while the lock is held (for health checks).",
)
@click.pass_context
@handles_errors
def beat(
    ctx: click.Context, loglevel: str, schedule: Path | None, heartbeat_file: Path | None
) -> None:
    """Run Celery beat under a PostgreSQL lock: a second beat waits as a standby."""
    from workers.beat import run_beat  # Celery stays out of billing/ (imported on use)

    settings = settings_of(ctx)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    run_beat(
        settings, loglevel, schedule or settings.data_dir / "celerybeat-schedule", heartbeat_file
    )


COMMANDS = (partitions, retention, broker_group, beat)
