"""Export settings come from the environment with embedded defaults."""

from __future__ import annotations

from pathlib import Path

from billing.settings import Settings


def test_exports_dir_and_queue_defaults_and_overrides() -> None:
    default = Settings.from_env({"BILLING_DATA_DIR": "/tmp/bd"})
    assert default.exports_dir == Path("/tmp/bd/exports")
    assert default.exports_queue == "billing.exports"
    custom = Settings.from_env(
        {"BILLING_EXPORTS_DIR": "/srv/exports", "BILLING_EXPORTS_QUEUE": "exports.eu"}
    )
    assert (custom.exports_dir, custom.exports_queue) == (Path("/srv/exports"), "exports.eu")
