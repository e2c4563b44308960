"""Opening a database: engines tuned per backend, and the schema version check.

SQLite runs in WAL mode, so readers never block the writer; the writer takes
the lock when its transaction begins (BEGIN IMMEDIATE), not halfway through
it, and waits up to `busy_timeout` for another process. Postgres is reached
through psycopg 3 whatever driver the URL names.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Dict, FrozenSet, Optional, Tuple

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.pool import NullPool

from routelens import migrations

from .errors import DatabaseError

if TYPE_CHECKING:
    from alembic.config import Config

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Values bound in one IN (...): within SQLite's 32,766 parameters and PostgreSQL's 65,535.
IDS_PER_STATEMENT = 10_000


def normalize_url(url: str) -> str:
    """A URL SQLAlchemy opens with our drivers; a bare path means a SQLite file."""
    if "://" not in url:
        return f"sqlite:///{os.path.abspath(url)}"
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseError(f"not a database URL: {url!r} (try sqlite:///routelens.db or "
                            "postgresql://user@host/dbname)") from None
    if parsed.get_backend_name() == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif parsed.get_backend_name() != "sqlite":
        raise DatabaseError(f"unsupported database {parsed.get_backend_name()!r}: use SQLite or PostgreSQL")
    elif parsed.database in (None, "", ":memory:"):  # an in-memory database: each connection its own, all lost
        raise DatabaseError(f"{url!r} names no file: use sqlite:///PATH (or just PATH)")
    return parsed.render_as_string(hide_password=False)


def missing_sqlite_file(url: str) -> Optional[str]:
    """The path of a SQLite database that does not exist yet, else None.
    Opening it would create it: commands that only read must not."""
    parsed = make_url(normalize_url(url))
    if parsed.get_backend_name() == "sqlite" and parsed.database and not os.path.exists(parsed.database):
        return parsed.database
    return None


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def make_engine(url: str, sqlite_cache_mb: int = 64, pooled: bool = True) -> Engine:
    """`sqlite_cache_mb`: SQLite's page cache per connection. A server reads
    the same pages again and again; a one-off scan (export) needs little.
    `pooled=False`: each connection is opened when taken and closed when
    given back (the collector's exports: few, long, and never waiting on the
    pool of the requests that must stay fast)."""
    url = normalize_url(url)
    pool = {"pool_size": 8, "max_overflow": 8} if pooled else {"poolclass": NullPool}
    if make_url(url).get_backend_name() == "sqlite":
        return _sqlite_engine(url, sqlite_cache_mb, pool)
    return create_engine(url, pool_pre_ping=True, **pool)


def _sqlite_engine(url: str, cache_mb: int, pool: dict) -> Engine:
    # isolation_level=None hands transaction control to us, so that BEGIN can
    # be IMMEDIATE for writers (see the "begin" listener below).
    engine = create_engine(url, connect_args={"check_same_thread": False, "isolation_level": None}, **pool)

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL keeps the file consistent
        cursor.execute(f"PRAGMA cache_size={-1024 * cache_mb}")  # negative: in KiB
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection):
        immediate = connection.get_execution_options().get("sqlite_begin_immediate")
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def writer(connection):
    """The connection, set to take SQLite's write lock when its transaction begins."""
    return connection.execution_options(sqlite_begin_immediate=True)


# --- schema version (Alembic) ---
#
# Alembic is imported only to migrate. Checking a database's version (every
# command that opens one: an export, the collector) reads Alembic's version
# table and the revision identifiers of the scripts in migrations/versions,
# without importing them: importing Alembic costs some 11 MB resident, a
# twentieth of an export's memory.

def alembic_config(url: str) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.attributes["url"] = normalize_url(url)
    return config


@functools.cache  # the scripts are the installed package's: read once, not at every schema check
def _scripts() -> Dict[str, Tuple[Tuple[Optional[str], ...], FrozenSet[str]]]:
    """Every migration script's revision -> (the revisions it follows, the tables it creates)."""
    scripts = {}
    for script in (Path(migrations.__file__).parent / "versions").glob("*.py"):
        text = script.read_text()
        identifiers = _script_identifiers(script, text)
        if "revision" in identifiers:
            down = identifiers.get("down_revision")
            scripts[identifiers["revision"]] = (tuple(down) if isinstance(down, (tuple, list)) else (down,),
                                                frozenset(_CREATED_TABLE.findall(text)))
    return scripts


def script_revisions() -> Dict[str, Tuple[Optional[str], ...]]:
    """Every migration script's revision, and the revisions it follows (its down_revision)."""
    return {revision: downs for revision, (downs, _) in _scripts().items()}


def tables_added_after(revision: str) -> FrozenSet[str]:
    """The tables that migrations after `revision` (one of ours) create: a database there has none of them yet."""
    scripts = _scripts()
    reached, todo = set(), [revision]
    while todo:  # `revision` and every revision before it
        current = todo.pop()
        if current is not None and current not in reached and current in scripts:
            reached.add(current)
            todo.extend(scripts[current][0])
    return frozenset(table for other, (_, created) in scripts.items() if other not in reached for table in created)


def head_revision() -> str:
    """The newest migration's revision: the one no other script names as its down_revision."""
    revisions = script_revisions()
    heads = set(revisions) - {down for downs in revisions.values() for down in downs}
    if len(heads) != 1:
        raise DatabaseError(f"migrations/versions has {len(heads)} heads: {', '.join(sorted(heads))}")
    return heads.pop()


# `revision: str = '0003'`, `down_revision: Union[...] = '0002'` (or None, or a tuple of revisions) at the
# start of a line, as Alembic's script template writes them. Read as text, not with `ast.parse`: CPython
# 3.11 keeps the AST constructor's recursion count in state shared by threads, and a parse racing another
# thread's fails now and then with "SystemError: AST constructor recursion depth mismatch" (CPython
# gh-106905; seen in CI while a collector's thread checked the schema).
_IDENTIFIER = re.compile(r"^(revision|down_revision)(?:\s*:[^=\n]*)?\s*=\s*(.+?)\s*$", re.MULTILINE)
_QUOTED = re.compile(r"'([^']*)'|\"([^\"]*)\"")
# `op.create_table('name', ...`, as Alembic's autogenerate writes it.
_CREATED_TABLE = re.compile(r"""op\.create_table\(\s*['"]([^'"]+)['"]""")


def _script_identifiers(path: Path, text: str) -> dict:
    """A migration script's `revision` and `down_revision`, as the literals it assigns them."""
    identifiers = {}
    for name, value in _IDENTIFIER.findall(text):
        revisions = [single or double for single, double in _QUOTED.findall(value)]
        if value == "None":
            identifiers[name] = None
        elif value[0] in "([":
            identifiers[name] = tuple(revisions)
        elif len(revisions) == 1:
            identifiers[name] = revisions[0]
        else:
            raise DatabaseError(f"{path.name}: {name} = {value}: not a revision, None or a tuple of revisions")
    return identifiers


def current_revision(engine: Engine) -> Optional[str]:
    """The revision in Alembic's version table; None without one (or with no row)."""
    with engine.connect() as connection:
        return revision_of(connection)


def revision_of(connection) -> Optional[str]:
    """`current_revision`, read on a connection already open."""
    if not inspect(connection).has_table("alembic_version"):
        return None
    versions = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    if len(versions) > 1:  # branches: never made by routelens's linear history
        raise DatabaseError(f"the database's alembic_version holds several revisions: {', '.join(versions)}")
    return versions[0] if versions else None


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate to `revision` (one of `script_revisions()`, or "head"). Refuses,
    changing nothing, a database it cannot open or one a later routelens wrote."""
    from alembic import command

    engine = make_engine(url)
    try:
        current = _opened_revision(engine)
        if current is not None and current not in script_revisions():
            raise DatabaseError(_newer_message(current))
        if current is not None:
            _refuse_if_not_ours(engine, current, url)
    finally:
        engine.dispose()
    try:
        command.upgrade(alembic_config(url), revision)
    except OperationalError as exc:
        raise DatabaseError(f"cannot open the database: {first_line(exc)}") from None


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def check_schema(engine: Engine, url: str) -> None:
    """Refuse a database whose schema is not this version's; create a new SQLite one."""
    current = _opened_revision(engine)
    head = head_revision()
    if current in script_revisions():
        _refuse_if_not_ours(engine, current, url)
    if current == head:
        return
    if current is None and is_sqlite(engine) and not inspect(engine).get_table_names():
        upgrade(url)
        return
    shown = _shown(url)
    if current is None:
        raise DatabaseError(f"the database has no routelens schema: run `routelens db upgrade --db {shown}`")
    if current not in script_revisions():
        raise DatabaseError(_newer_message(current))
    raise DatabaseError(f"the database schema ({current}) is behind this routelens ({head}): "
                        f"run `routelens db upgrade --db {shown}`")


def schema_problem(connection, revision: str) -> Optional[str]:
    """Why the tables of a database whose alembic_version says `revision` (one
    of ours) are not routelens', or None. Another application's database can
    hold an alembic_version row that names one of our revisions; its tables
    cannot be ours. At head, every table and column of the models must be
    there (the migrations make exactly those: a test compares them); behind
    head, every table but those later migrations create (their columns the
    migrations may still have to change)."""
    from .models import Base  # here: the version check of a command that exits at once needs no models

    present = inspect(connection).get_multi_columns()
    columns = {table: {column["name"] for column in found} for (_schema, table), found in present.items()}
    later = tables_added_after(revision)
    for table in Base.metadata.sorted_tables:
        if table.name not in columns:
            if table.name in later:  # a later migration creates it
                continue
            return f"it has no table {table.name}"
        missing = [column.name for column in table.columns if column.name not in columns[table.name]]
        if revision == head_revision() and missing:
            return f"its table {table.name} has no column {missing[0]}"
    return None


def _refuse_if_not_ours(engine: Engine, revision: str, url: str) -> None:
    with engine.connect() as connection:
        problem = schema_problem(connection, revision)
    if problem:
        raise DatabaseError(f"the database at {_shown(url)} is not routelens' (its alembic_version says {revision}, "
                            f"but {problem}): give another --db")


def write_problem(connection) -> Optional[str]:
    """Why nothing can be stored in the database now, or None: a SQLite file
    this process may not write (SQLite then opens it read-only, and every
    write fails), a PostgreSQL database or server in read-only mode. Asked
    without writing, so without waiting for the write lock."""
    if connection.dialect.name == "sqlite":
        path = connection.engine.url.database
        if not os.access(path, os.W_OK):
            return f"the database file is read-only for this process: {path}"
        return None
    if connection.exec_driver_sql("SHOW transaction_read_only").scalar() == "on":
        return "the database is read-only (transaction_read_only is on)"
    return None


def _shown(url: str) -> str:
    """The URL as the user wrote it (password hidden), so that a command
    naming it can be pasted as it is: the normalized one names our driver."""
    return make_url(url).render_as_string(hide_password=True) if "://" in url else url


def _opened_revision(engine: Engine) -> Optional[str]:
    """`current_revision`, with a database that cannot be opened a `DatabaseError`."""
    try:
        return current_revision(engine)
    except DatabaseError:
        raise
    except Exception as exc:  # unreachable server, bad credentials, not a database file
        raise DatabaseError(f"cannot open the database: {first_line(exc)}") from None


def _newer_message(current: str) -> str:
    return f"the database schema ({current}) is newer than this routelens ({head_revision()}): upgrade routelens"


def first_line(exc: Exception) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
