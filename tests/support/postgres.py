"""A throwaway PostgreSQL cluster, for the test session and the benchmarks.

`PostgresCluster` runs initdb and pg_ctl from a local PostgreSQL install
(Debian's PostgreSQL 15 by default) in a temporary directory: trust
authentication, TCP on 127.0.0.1 at a free port, its Unix socket in the same
directory. Tests run it in memory where there is a tmpfs with fsync off (the
data is thrown away); benchmarks choose, and print, fsync on (with
synchronous_commit, what a production server does) or off (the CPU path).
PostgreSQL refuses to run as root, so when the tests run as root the server
runs as the `postgres` system user, which must own the data directory.

Tests get databases cloned from a template that was migrated once:
`CREATE DATABASE ... TEMPLATE` copies files, far faster than running the
migrations for every test.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from typing import List, Optional

import psycopg

from tests.support.ports import free_port

DEFAULT_BINDIR = "/usr/lib/postgresql/15/bin"


def _installed_bindir() -> str:
    """Debian's PostgreSQL 15, else the newest version Debian's layout holds."""
    if os.path.isdir(DEFAULT_BINDIR):
        return DEFAULT_BINDIR
    found = glob.glob("/usr/lib/postgresql/*/bin")
    found.sort(key=lambda path: int(path.split("/")[-2]) if path.split("/")[-2].isdigit() else 0)
    return found[-1] if found else DEFAULT_BINDIR


# Where initdb, pg_ctl and postgres are; ROUTELENS_PG_BINDIR for other installs.
BINDIR = os.environ.get("ROUTELENS_PG_BINDIR") or _installed_bindir()
SERVER_USER = "postgres"  # the OS user the server runs as when we are root
SUPERUSER = "postgres"  # the database superuser initdb creates


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be started here; the message says what is missing."""


def _memory_dir() -> Optional[str]:
    """A RAM-backed directory, where there is one. Even with fsync off,
    CREATE DATABASE costs a quarter of a second per test on a disk and a
    hundredth in memory (it flushes the dirty buffers of earlier tests)."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


def check_available(bindir: str = BINDIR) -> None:
    """Raise `PostgresUnavailable` unless a cluster can be started from `bindir`."""
    missing = [name for name in ("initdb", "pg_ctl", "postgres")
               if not os.access(os.path.join(bindir, name), os.X_OK)]
    if missing:
        raise PostgresUnavailable(f"PostgreSQL binaries missing in {bindir}: {', '.join(missing)} "
                                  "(install postgresql-15, or set ROUTELENS_PG_BINDIR)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            raise PostgresUnavailable(f"running as root, and there is no {SERVER_USER!r} system user to run "
                                      "PostgreSQL as (PostgreSQL refuses to run as root)") from None


class PostgresCluster:
    def __init__(self, bindir: str = BINDIR, fsync: bool = False):
        self.bindir = bindir
        self.fsync = fsync
        self.port = 0
        self.dir: Optional[str] = None
        self._as_root = os.geteuid() == 0

    @property
    def data_dir(self) -> str:
        return os.path.join(self.dir, "data")

    @property
    def log_file(self) -> str:
        return os.path.join(self.dir, "server.log")

    def _run(self, *args: str) -> None:
        command: List[str] = [os.path.join(self.bindir, args[0]), *args[1:]]
        if self._as_root:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise PostgresUnavailable(f"{args[0]} failed ({result.returncode}): {result.stderr.strip()}"
                                      f"{self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            with open(self.log_file) as log:
                return "\nserver log:\n" + "".join(log.readlines()[-20:])
        except OSError:
            return ""

    def start(self) -> "PostgresCluster":
        check_available(self.bindir)
        # With fsync on, the disk is part of what is measured.
        self.dir = tempfile.mkdtemp(prefix="routelens-pg-", dir=None if self.fsync else _memory_dir())
        if self._as_root:
            entry = pwd.getpwnam(SERVER_USER)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self.port = free_port()
        self._run("initdb", "-D", self.data_dir, "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
                  "--no-locale", "--no-sync")
        durability = (["-c fsync=on", "-c synchronous_commit=on"] if self.fsync
                      else ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"])
        self._options = " ".join([
            "-c listen_addresses=127.0.0.1", f"-c port={self.port}", f"-c unix_socket_directories={self.dir}",
            *durability, "-c max_connections=200",  # every test app keeps a small pool open
        ])
        self.start_server()
        return self

    def start_server(self) -> None:
        """Start the server on the cluster's data: at `start`, and again after
        `stop_server` (same port, same databases)."""
        self._run("pg_ctl", "-D", self.data_dir, "-l", self.log_file, "-o", self._options, "-w", "-t", "60",
                  "start")

    def stop_server(self, mode: str = "fast") -> None:
        """Stop the server but keep its data, for tests of a database outage.
        `fast` disconnects clients and shuts down cleanly; `immediate` is a
        crash (the next start recovers from the WAL)."""
        self._run("pg_ctl", "-D", self.data_dir, "-m", mode, "-w", "stop")

    def stop(self) -> None:
        if self.dir is None:
            return
        try:
            if os.path.exists(os.path.join(self.data_dir, "postmaster.pid")):
                self._run("pg_ctl", "-D", self.data_dir, "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def postmaster_pid(self) -> int:
        with open(os.path.join(self.data_dir, "postmaster.pid")) as pid_file:
            return int(pid_file.readline())

    def url(self, dbname: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def _admin(self, sql: str) -> None:
        # CREATE/DROP DATABASE cannot run inside a transaction.
        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(sql)

    def create_database(self, name: Optional[str] = None, template: Optional[str] = None) -> str:
        """A new database (a copy of `template`, if given); returns its name."""
        name = name or f"t_{uuid.uuid4().hex[:16]}"
        clause = f" TEMPLATE {template} STRATEGY FILE_COPY" if template else ""
        self._admin(f'CREATE DATABASE "{name}"{clause}')
        return name

    def drop_database(self, name: str) -> None:
        # FORCE: a test that failed may have left connections open.
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class PostgresServer:
    """The session's cluster, and a template database migrated to head."""

    TEMPLATE = "routelens_template"

    def __init__(self, cluster: PostgresCluster):
        self.cluster = cluster

    def new_database(self, migrated: bool = True) -> str:
        """The URL of a new database: a copy of the template at head, or empty."""
        name = self.cluster.create_database(template=self.TEMPLATE if migrated else None)
        return self.cluster.url(name)

    def drop(self, url: str) -> None:
        self.cluster.drop_database(url.rsplit("/", 1)[1])
