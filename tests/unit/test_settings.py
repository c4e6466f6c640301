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
