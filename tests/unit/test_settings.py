from __future__ import annotations

import pytest

from billing.errors import ConfigError
from billing.settings import Settings


def test_defaults_are_embedded() -> None:
    settings = Settings.from_env({})
    assert settings.embedded_database and settings.embedded_broker
    assert settings.usage_queue == "billing.usage"


def test_environment_overrides() -> None:
    settings = Settings.from_env(
        {
            "BILLING_DATABASE_URL": "postgresql://db/x",
            "BILLING_BROKER_URL": "amqp://b//",
            "BILLING_BATCH_SIZE": "100",
            "BILLING_USAGE_QUEUE": "q",
        }
    )
    assert not settings.embedded_database and settings.batch_size == 100
    assert settings.usage_queue == "q"


def test_bad_numbers_name_the_variable() -> None:
    with pytest.raises(ConfigError, match="BILLING_BATCH_SIZE"):
        Settings.from_env({"BILLING_BATCH_SIZE": "many"})
    with pytest.raises(ConfigError, match="BILLING_PREFETCH"):
        Settings.from_env({"BILLING_PREFETCH": "0"})


def test_max_event_charge() -> None:
    from decimal import Decimal

    assert Settings.from_env({}).max_event_charge == Decimal(1000)
    assert Settings().max_event_charge == Decimal(1000)
    cap = Settings.from_env({"BILLING_MAX_EVENT_CHARGE": "2500.50"}).max_event_charge
    assert cap == Decimal("2500.50") and isinstance(cap, Decimal)
    for off in ("0", "0.00"):
        assert Settings.from_env({"BILLING_MAX_EVENT_CHARGE": off}).max_event_charge is None
    for bad in ("lots", "-1", "NaN", "Infinity", "1e"):
        with pytest.raises(ConfigError, match="BILLING_MAX_EVENT_CHARGE"):
            Settings.from_env({"BILLING_MAX_EVENT_CHARGE": bad})


def test_spend_control_settings() -> None:
    from datetime import timedelta

    default = Settings.from_env({})
    assert (default.hold_ttl, default.authorize_token) == (timedelta(minutes=15), "")
    s = Settings.from_env({"BILLING_HOLD_TTL_S": "60", "BILLING_AUTHORIZE_TOKEN": "secret"})
    assert s.hold_ttl == timedelta(seconds=60)
    assert "secret" not in repr(s)  # never logged
    urls = Settings.from_env(
        {
            "BILLING_DATABASE_URL": "postgresql://billing:DbPw@db/billing",
            "BILLING_BROKER_URL": "amqp://billing:MqPw@mq//",
        }
    )
    assert "DbPw" not in repr(urls) and "MqPw" not in repr(urls)
    with pytest.raises(ConfigError, match="BILLING_HOLD_TTL_S"):
        Settings.from_env({"BILLING_HOLD_TTL_S": "0"})


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://billing:S3cret%zzPW@127.0.0.1:5432/billing",  # a bad %-escape
        "postgresql://billing:S3cret@PW@127.0.0.1:5432/billing",  # an unescaped @
        "postgresql://billing:S3cretPW@[::1:5432/billing",  # a broken IPv6 host
    ],
)
def test_a_malformed_database_url_is_refused_without_repeating_it(url: str) -> None:
    """libpq's own messages quote the offending text, password included."""
    with pytest.raises(ConfigError, match="BILLING_DATABASE_URL") as error:
        Settings.from_env({"BILLING_DATABASE_URL": url})
    assert "S3cret" not in str(error.value) and "PW" not in str(error.value)
    good = "postgresql://billing:p%40ss@127.0.0.1:5432/billing"
    assert Settings.from_env({"BILLING_DATABASE_URL": good}).database_url == good


SECRETS = {
    "BILLING_DATABASE_URL": "postgresql://billing:S3cretPW@db.internal:5432/billing",
    "BILLING_BROKER_URL": "amqp://billing:S3cretPW@mq.internal:5672/billing",
    "BILLING_STRIPE_API_KEY": "sk_live_S3cretPW",
    "BILLING_STRIPE_WEBHOOK_SECRET": "whsec_S3cretPW,whsec_S3cretOLD",
    "BILLING_AUTHORIZE_TOKEN": "S3cretPW",
}


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_a_placeholder_left_in_a_secret_is_refused_without_repeating_it(name: str) -> None:
    """The deploy examples hold CHANGE_ME in every secret: a deployment that forgot one stops."""
    Settings.from_env(SECRETS)  # the real ones are accepted
    value = SECRETS[name].replace("S3cretPW", "S3cret_CHANGE_ME", 1)
    with pytest.raises(ConfigError, match=f"{name} still holds the CHANGE_ME placeholder") as error:
        Settings.from_env({**SECRETS, name: value})
    assert "S3cret" not in str(error.value) and "internal" not in str(error.value)


def test_every_placeholder_left_is_named_at_once() -> None:
    env = {name: "CHANGE_ME" for name in SECRETS}
    with pytest.raises(ConfigError) as error:
        Settings.from_env(env)
    assert all(name in str(error.value) for name in SECRETS)
    # not a secret: the check leaves other settings alone
    assert Settings.from_env({"BILLING_USAGE_QUEUE": "CHANGE_ME"}).usage_queue == "CHANGE_ME"
