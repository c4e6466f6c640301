"""Connections, the migration runner and the named-query loader.

* ``database_url`` resolves the embedded default (a ``pgserver`` PostgreSQL in the data folder) or
  the configured URL.
* ``migrate`` applies ``sql/migrations/NNNN_name.sql`` in order, each in its own transaction, under
  a PostgreSQL advisory lock so that many workers starting at once apply each file exactly once. An
  applied file whose text changed is refused (its checksum is recorded).
* ``QUERIES`` holds the named statements of ``sql/queries/*.sql`` (``-- name: foo`` sections), so
  SQL lives in ``.sql`` files and code refers to it by name.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, LiteralString

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from billing.errors import BillingError, ConfigError
from billing.settings import Settings

MIGRATION_LOCK_KEY = 0x6269_6C6C_696E_67  # "billing"
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_QUERY_HEADER = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)

_embedded_lock = threading.Lock()
_embedded_servers: dict[Path, Any] = {}


def database_url(settings: Settings) -> str:
    """The URL to connect to: the configured one, or the embedded pgserver's (started on demand)."""
    if not settings.embedded_database:
        return settings.database_url
    with _embedded_lock:
        server = _embedded_servers.get(settings.pg_dir)
        if server is None:
            try:
                from pgserver.postgres_server import get_server
            except ImportError as exc:  # pragma: no cover - pgserver is a dependency
                raise ConfigError("embedded mode needs the 'pgserver' package") from exc
            settings.pg_dir.mkdir(parents=True, exist_ok=True)
            server = get_server(settings.pg_dir, cleanup_mode="stop")
            _embedded_servers[settings.pg_dir] = server
        return str(server.get_uri())


def connect(settings: Settings) -> psycopg.Connection[Any]:
    """An autocommit connection: every transaction is an explicit ``conn.transaction()`` block."""
    return psycopg.connect(database_url(settings), autocommit=True)


def make_pool(settings: Settings, *, min_size: int = 1, max_size: int = 4) -> ConnectionPool:
    """A psycopg pool; connections are checked before use so a restarted server is survived."""
    return ConnectionPool(
        database_url(settings),
        min_size=min_size,
        max_size=max_size,
        check=ConnectionPool.check_connection,
        kwargs={"autocommit": True},
        open=True,
        name="billing",
    )


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(sql_dir: Path) -> list[Migration]:
    migrations = []
    for path in sorted((sql_dir / "migrations").glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if not match:
            raise ConfigError(f"migration file name must be NNNN_name.sql: {path.name}")
        migrations.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise ConfigError(f"duplicate migration numbers in {sql_dir / 'migrations'}")
    return migrations


def migrate(conn: psycopg.Connection[Any], sql_dir: Path) -> list[str]:
    """Apply pending migrations; returns the names applied. Safe to run from many processes."""
    applied_now: list[str] = []
    previous, conn.autocommit = conn.autocommit, True
    try:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version integer PRIMARY KEY,
                       name text NOT NULL,
                       checksum text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            rows = conn.execute("SELECT version, name, checksum FROM schema_migrations").fetchall()
            done = {version: (name, checksum) for version, name, checksum in rows}
            for migration in load_migrations(sql_dir):
                if migration.version in done:
                    if done[migration.version][1] != migration.checksum:
                        raise BillingError(
                            f"migration {migration.version:04d}_{migration.name} was edited after "
                            "it was applied; add a new migration instead"
                        )
                    continue
                with conn.transaction():
                    conn.execute(migration.sql)  # a repository file, not user input
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) "
                        "VALUES (%s, %s, %s)",
                        (migration.version, migration.name, migration.checksum),
                    )
                applied_now.append(f"{migration.version:04d}_{migration.name}")
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    finally:
        conn.autocommit = previous
    return applied_now


class Queries:
    """Named SQL statements read from ``sql/queries/*.sql``."""

    def __init__(self, sql_dir: Path) -> None:
        self._queries: dict[str, LiteralString] = {}
        for path in sorted((sql_dir / "queries").glob("*.sql")):
            text = path.read_text()
            headers = list(_QUERY_HEADER.finditer(text))
            for i, header in enumerate(headers):
                end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
                body = text[header.end() : end].strip().rstrip(";").strip()
                name = header[1]
                if name in self._queries:
                    raise ConfigError(f"query {name!r} defined twice ({path.name})")
                # Repository files, never user input: safe to treat as literal SQL.
                self._queries[name] = body

    def __getitem__(self, name: str) -> LiteralString:
        try:
            return self._queries[name]
        except KeyError:
            raise ConfigError(f"no query named {name!r} in sql/queries") from None

    def names(self) -> list[str]:
        return sorted(self._queries)


_queries_cache: dict[Path, Queries] = {}


def queries(settings: Settings) -> Queries:
    found = _queries_cache.get(settings.sql_dir)
    if found is None:
        found = _queries_cache[settings.sql_dir] = Queries(settings.sql_dir)
    return found


def fetch_dicts(
    conn: psycopg.Connection[Any], query: LiteralString, params: Any = None
) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params)
        return cur.fetchall()


_TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "55", "57")  # connection, rollback, resources,
# object state (lock not available), operator intervention (statement timeout, shutdown)


_CHECK_VIOLATION = "23514"


def text_array(values: Sequence[object]) -> str:
    """A list as one newline-separated text, for ``string_to_array(%(x)s, E'\\n')`` in SQL.

    psycopg builds a list parameter value by value in Python (about 0.7 us a value); a batch
    sends thousands (event ids, accounts, amounts). Identifiers are visible ASCII and amounts
    decimals, so a newline never occurs in one; an empty list is ``''``, an empty array.
    """
    texts = [str(v) for v in values]
    joined = "\n".join(texts)
    if not all(texts) or joined.count("\n") != max(len(texts) - 1, 0):
        raise ValueError("a value of a text array is empty or has a newline")
    return joined


def map_error(exc: psycopg.Error) -> BillingError:
    """Map a driver error to the billing hierarchy: Transient (retry) or DatabaseRejected."""
    from billing.errors import DatabaseRejected, Transient

    sqlstate = exc.sqlstate or ""
    if sqlstate == _CHECK_VIOLATION and "no partition of relation" in str(exc):
        # A month without its usage_events partition (partition upkeep did not run): every row
        # of the month would fail. Wait for `billing partitions ensure`, do not park the traffic.
        return Transient(f"database: {exc} (run `billing partitions ensure`)")
    if isinstance(exc, psycopg.OperationalError) and not sqlstate:
        return Transient(f"database unavailable: {exc}")
    if sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES or isinstance(exc, psycopg.InterfaceError):
        return Transient(f"database: {exc}")
    return DatabaseRejected(f"database rejected the data ({sqlstate}): {exc}")
