"""What every ``billing`` command module shares: settings, actor, error handling, output.

Kept apart from ``billing.cli`` (the entry point) so that feature modules (``cli_stripe``,
``cli_exports``) can be imported by it without importing it back.
"""

from __future__ import annotations

import getpass
import sys
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from functools import wraps
from typing import Any, TypeVar

import click
import psycopg
from rich.console import Console

from billing.db import map_error
from billing.errors import BillingError
from billing.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])
console = Console()
err_console = Console(stderr=True)


def current_actor() -> str:
    """Who runs the command, for the ledger's actor columns."""
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user database entry (containers)
        return "cli:unknown"


def handles_errors(fn: F) -> F:
    """A ``BillingError`` prints one line on stderr and exits 2 (no traceback); so does a
    database error, mapped to one (``billing.db.map_error``)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (BillingError, psycopg.Error) as exc:
            error = map_error(exc) if isinstance(exc, psycopg.Error) else exc
            err_console.print(f"[red]error:[/red] {error}", markup=True, highlight=False)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


def settings_of(ctx: click.Context) -> Settings:
    """The one Settings object of this invocation, read from the environment once."""
    return ctx.ensure_object(dict).setdefault("settings", Settings.from_env())  # type: ignore[no-any-return]


def parse_amount(value: str, name: str = "AMOUNT") -> Decimal:
    try:
        return Decimal(value)
    except InvalidOperation:
        raise click.BadParameter(f"not a decimal amount: {value!r}", param_hint=name) from None
