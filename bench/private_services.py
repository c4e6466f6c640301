"""Private PostgreSQL and RabbitMQ servers that a fault-injection run owns and may kill.

The shared servers on 5432/5672 are used by everyone's tests at once and are never stopped. A
chaos run starts its own:

* ``PrivatePostgres``: a temporary cluster (``initdb`` + ``pg_ctl`` from
  ``/usr/lib/postgresql/15/bin``) on a free port, trust auth, data in a temp dir; ``restart`` is
  ``pg_ctl restart -m fast`` (connections are cut, as in a failover).
* ``PrivateRabbit``: a second RabbitMQ node (``RABBITMQ_NODENAME=chaos-<pid>@localhost``) with its
  own ports, mnesia and log dirs, an empty plugin list and its own config file (the machine's
  ``rabbitmq.conf`` pins 5672); ``stop``/``start`` via ``rabbitmqctl -n <node> stop``.

Both refuse to run as root the way the servers do: PostgreSQL's files are owned by ``postgres``
and RabbitMQ's by ``rabbitmq`` when the caller is root (the servers switch to those users).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

PG_BIN = Path(os.environ.get("BILLING_CHAOS_PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _chown(path: Path, user: str) -> None:
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


def _as(user: str, argv: list[str]) -> list[str]:
    """Run argv as ``user`` when we are root (initdb/pg_ctl refuse root)."""
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", user, "--", *argv]


class PrivatePostgres:
    def __init__(self, base: Path | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="chaos-pg-", dir=base))
        self.data = self.dir / "data"
        self.port = free_port()
        self.log = self.dir / "server.log"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def init(self) -> None:
        _chown(self.dir, "postgres")
        subprocess.run(
            _as(
                "postgres",
                [
                    str(PG_BIN / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                ],
            ),
            check=True,
            capture_output=True,
        )
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.dir}'\nfsync = off\n"
                "synchronous_commit = off\nfull_page_writes = off\nmax_connections = 100\n"
                "shared_buffers = 64MB\n"
            )
        _chown(self.dir, "postgres")

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            _as(
                "postgres",
                [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", *args],
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        self._ctl("start")
        self.wait_ready()

    def stop(self) -> None:
        self._ctl("stop", "-m", "fast")

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast")
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        self.init()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


class PrivateRabbit:
    def __init__(self, base: Path | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="chaos-rmq-", dir=base))
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"chaos-{os.getpid()}-{self.port}@localhost"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env.update(
            {
                "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.dir / "log"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
                "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
                "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            }
        )
        return env

    def init(self) -> None:
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text(
            "ERL_EPMD_ADDRESS=127.0.0.1\n"
            'export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"\n'
        )
        (self.dir / "advanced.config").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            "log.console = false\n"
            "log.file.level = warning\n"
            # the disk alarm would block publishers on a busy CI disk
            "disk_free_limit.absolute = 10MB\n"
        )
        _chown(self.dir, "rabbitmq")

    def _ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["rabbitmqctl", "-q", "-n", self.node, *args],
            env=self._env(),
            capture_output=True,
            timeout=timeout,
        )

    def start(self, timeout: float = 90) -> None:
        log = open(self.dir / f"server-{self.starts}.out", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["rabbitmq-server"], env=self._env(), stdout=log, stderr=subprocess.STDOUT
        )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while not _port_open(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited; see {log.name}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"RabbitMQ node {self.node} did not start")
            time.sleep(0.2)
        self._ctl("await_startup", "--timeout", str(int(timeout)))

    def stop(self) -> None:
        self._ctl("stop")
        if self.proc is not None:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateRabbit:
        self.init()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()
