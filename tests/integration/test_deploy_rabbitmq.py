"""deploy/rabbitmq/definitions.json on the real broker: RabbitMQ accepts it, the code's own
topology (from deploy/billing.env.example) declares against it without a conflict, and the
Kubernetes definitions Job's `--create-broker-user` gives the billing processes their login."""

from __future__ import annotations

import base64
import contextlib
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import amqp
import pytest
from click.testing import CliRunner
from kombu import Exchange, Queue
from kombu.exceptions import OperationalError

from billing import broker
from billing.cli import main
from billing.errors import BillingError
from billing.settings import Settings

from .helpers import make_event

ROOT = Path(__file__).resolve().parents[2]
MANAGEMENT = "http://127.0.0.1:15672"
AUTH = "Basic " + base64.b64encode(b"guest:guest").decode()


def _api(method: str, path: str, body: object = None) -> None:
    request = urllib.request.Request(
        MANAGEMENT + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": AUTH, "Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=30).close()


@pytest.fixture
def management() -> None:
    try:
        urllib.request.urlopen(MANAGEMENT, timeout=5).close()
    except OSError:
        pytest.fail("RabbitMQ management API not reachable: .ci/run enables rabbitmq_management")


@pytest.fixture
def vhost(management: None) -> Iterator[str]:
    name = f"test-defs-{uuid.uuid4().hex[:10]}"
    yield name
    _api("DELETE", f"/api/vhosts/{name}")


def example_settings(broker_url: str) -> Settings:
    """The settings of deploy/billing.env.example, filled in, on ``broker_url``."""
    env = {}
    for line in (ROOT / "deploy" / "billing.env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value.replace("CHANGE_ME", "filled-in")  # placeholders are refused
    return replace(Settings.from_env(env), broker_url=broker_url)


def test_definitions_import_and_the_code_declares_against_them(vhost: str) -> None:
    text = (ROOT / "deploy" / "rabbitmq" / "definitions.json").read_text()
    defs = json.loads(text.replace('"vhost": "billing"', f'"vhost": "{vhost}"'))
    defs["vhosts"] = [{"name": vhost}]
    defs["permissions"] = [
        {"user": "guest", "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}
    ]
    broker.import_definitions(MANAGEMENT, "guest", "guest", json.dumps(defs).encode(), wait_s=10)

    settings = example_settings(f"amqp://guest:guest@127.0.0.1:5672/{vhost}")
    with broker.connect(settings) as conn:
        broker.declare_topology(conn, settings)  # 406 PRECONDITION_FAILED if they disagreed
        for name in (settings.tasks_queue, settings.exports_queue):  # as workers/app.py does
            Queue(name, Exchange(name, type="direct", durable=True), routing_key=name,
                  durable=True)(conn.channel()).declare()  # fmt: skip
        with broker.UsagePublisher(settings, conn) as publisher:
            publisher.publish(make_event("ev-1"))
        assert broker.queue_depth(conn, settings) == 1
        # and a disagreeing declaration is refused: the check above can fail
        with pytest.raises(amqp.exceptions.PreconditionFailed):
            conn.channel().queue_declare(
                settings.usage_queue, durable=True, arguments={"x-queue-type": "classic"}
            )


def test_the_definitions_job_creates_the_user_the_billing_processes_log_in_as(
    vhost: str, tmp_path: Path
) -> None:
    """Kubernetes: no RabbitMQ is booted with the billing user, so `import-definitions
    --create-broker-user` creates the user of BILLING_BROKER_URL, and the code logs in as it."""
    user = f"test-user-{uuid.uuid4().hex[:10]}"
    password = f"p@ss/w:rd%{uuid.uuid4().hex}"  # percent-encoded in the URL
    url = f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:5672/{vhost}"
    text = (ROOT / "deploy" / "rabbitmq" / "definitions.json").read_text()
    defs = json.loads(text.replace('"vhost": "billing"', f'"vhost": "{vhost}"'))
    defs["vhosts"] = [{"name": vhost}]
    (tmp_path / "definitions.json").write_text(json.dumps(defs))
    settings = example_settings(url)
    not_yet = (amqp.exceptions.AccessRefused, OperationalError)
    with broker.connect(settings) as conn, pytest.raises(not_yet):
        conn.ensure_connection(max_retries=1)  # the user does not exist yet
    args = [
        "broker", "import-definitions", str(tmp_path / "definitions.json"),
        "--url", MANAGEMENT, "--create-broker-user",
    ]  # fmt: skip
    env = {"RABBITMQ_DEFAULT_USER": "guest", "RABBITMQ_DEFAULT_PASS": "guest"}
    cli = CliRunner(env={**env, "BILLING_BROKER_URL": url})
    try:
        for _ in range(2):  # idempotent: every release runs it
            result = cli.invoke(main, args)
            assert result.exit_code == 0, result.output
            output = " ".join(result.output.split())
            assert f"user {user} can log in" in output and password not in output
        with broker.connect(settings) as conn:
            broker.declare_topology(conn, settings)
            with broker.UsagePublisher(settings, conn) as publisher:
                publisher.publish(make_event("ev-1"))
            assert broker.queue_depth(conn, settings) == 1
        # the administrator's own user is refused: updating it would drop its administrator tag
        admin_url = url.replace(quote(user, safe=""), "guest", 1)
        refused = CliRunner(env={**env, "BILLING_BROKER_URL": admin_url}).invoke(main, args)
        assert refused.exit_code == 2
        assert "RabbitMQ administrator 'guest'" in " ".join(refused.output.split())
    finally:
        with contextlib.suppress(urllib.error.HTTPError):  # 404: never created
            _api("DELETE", f"/api/users/{quote(user, safe='')}")


def test_a_failover_broker_url_creates_the_first_urls_user_and_never_shows_its_password(
    vhost: str, tmp_path: Path
) -> None:
    """BILLING_BROKER_URL may list brokers for failover (kombu and Celery split it at ";" and log
    in with the first URL): the Job creates that URL's user on that URL's vhost, and no answer of
    RabbitMQ's quotes the rest of the list, passwords included."""
    user = f"test-user-{uuid.uuid4().hex[:10]}"
    password = f"S3cret{uuid.uuid4().hex}"
    one = f"amqp://{user}:{password}@127.0.0.1:5672/{vhost}"
    url = f"{one};{one.replace('127.0.0.1', 'localhost')}"
    text = (ROOT / "deploy" / "rabbitmq" / "definitions.json").read_text()
    defs = json.loads(text.replace('"vhost": "billing"', f'"vhost": "{vhost}"'))
    defs["vhosts"] = [{"name": vhost}]
    (tmp_path / "definitions.json").write_text(json.dumps(defs))
    args = [
        "broker", "import-definitions", str(tmp_path / "definitions.json"),
        "--url", MANAGEMENT, "--create-broker-user", "--wait", "5",
    ]  # fmt: skip
    env = {"RABBITMQ_DEFAULT_USER": "guest", "RABBITMQ_DEFAULT_PASS": "guest"}
    try:
        result = CliRunner(env={**env, "BILLING_BROKER_URL": url}).invoke(main, args)
        output = " ".join(result.output.split())
        assert "S3cret" not in output, output
        assert result.exit_code == 0, output
        settings = example_settings(url)
        with broker.connect(settings) as conn:
            broker.declare_topology(conn, settings)  # logged in as the user created
    finally:
        with contextlib.suppress(urllib.error.HTTPError):
            _api("DELETE", f"/api/users/{quote(user, safe='')}")


def test_refused_definitions_are_a_clear_error(management: None) -> None:
    with pytest.raises(BillingError, match="RabbitMQ refused the definitions"):
        broker.import_definitions(MANAGEMENT, "guest", "wrong", b"{}", wait_s=5)


def test_a_placeholder_administrator_password_is_refused(tmp_path: Path) -> None:
    """The definitions one-shot refuses the examples' CHANGE_ME as it refuses it everywhere."""
    (tmp_path / "definitions.json").write_text("{}")
    env = {"RABBITMQ_DEFAULT_USER": "admin", "RABBITMQ_DEFAULT_PASS": "S3cret_CHANGE_ME"}
    args = ["broker", "import-definitions", str(tmp_path / "definitions.json")]
    result = CliRunner(env=env).invoke(main, [*args, "--url", "http://127.0.0.1:1", "--wait", "0"])
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "RABBITMQ_DEFAULT_PASS" in output, output
    assert "S3cret" not in output
