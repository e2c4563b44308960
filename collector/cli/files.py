"""`routelens export` and `routelens import`: files in and out, with progress on a terminal."""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from contextlib import contextmanager
from typing import BinaryIO, Callable, Iterator, Optional

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from ..export.names import FORMATS
from ..export.stream import ExportError, check, export
from ..query import figures
from ..query.filters import FilterError, Filters, build_filters
from ..store.db import check_schema, make_engine
from .errors import FileError, UsageError
from .gc_tuning import tune_gc_for_bulk_work

# The rollup counter that counts a table's rows, for the progress bar's total.
_COUNTED_BY = {"decisions": "decisions", "routed": "routed", "completed": "completions"}


def run_export(args) -> int:
    fmt = args.format or _format_of(args.output)
    f = filters_of(args)
    try:
        check(f, args.what, fmt)
    except ExportError as exc:
        raise UsageError(str(exc)) from None
    engine = make_engine(args.db, sqlite_cache_mb=8)
    tune_gc_for_bulk_work()
    try:
        check_schema(engine, args.db)
        with engine.connect() as connection, _output(args.output) as out, \
                progress(f"exporting {args.what}", lambda: expected_rows(connection, f, args.what)) as advance:
            for data in export(connection, f, args.what, fmt, on_rows=advance):
                out.write(data)
    finally:
        engine.dispose()
    if args.output != "-":
        print(f"routelens export: wrote {args.output}", file=sys.stderr)
    return 0


def filters_of(args) -> Filters:
    """The window and filters a command was given (commands._add_window_and_filters)."""
    # No window: everything recorded (the API's endpoints default to the last hour).
    since = args.since or (None if args.window else "0")
    try:
        return build_filters(args.window, since, args.until, args.app, args.deployment, args.router_class,
                             args.label, args.replica, args.request_id, args.model_id, args.reason)
    except FilterError as exc:
        raise UsageError(str(exc)) from None


def _format_of(output: str) -> str:
    extension = os.path.splitext(output)[1].lstrip(".").lower()
    if extension in FORMATS:
        return extension
    raise UsageError(f"cannot tell the format from {output!r}: give --format {'|'.join(FORMATS)}")


def expected_rows(connection, f, what: str) -> Optional[int]:
    """About the rows the export will hold, from the rollups (whole minutes), when they can tell."""
    if what not in _COUNTED_BY or f.request_id or f.model_id or f.replicas or f.reasons:
        return None
    return figures.summary(connection, f)[_COUNTED_BY[what]]


@contextmanager
def _output(path: str) -> Iterator["_Output"]:
    """Where the export goes. A regular file, new or not (or the file a
    symlink points to, the link kept), appears under its name only when
    complete: an interrupted export leaves nothing behind (or the previous
    file intact). A special file (a FIFO, a device, the pipe a shell passes as
    /dev/fd/N) is written to as it is: renaming over it would replace it.
    A place that cannot be written is a `UsageError`; a write that fails
    (a full disk, a reader gone) a `FileError`."""
    if path == "-":
        out = _Output(sys.stdout.buffer, "standard output")
        yield out
        out.flush()
        return
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory: name the file to write")
    if path.endswith(os.sep):
        raise UsageError(f"no such directory: {path}")
    try:
        special = not stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        special = False
    except OSError as exc:  # a path under a file, a directory it may not search
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    if special:
        try:
            file = open(path, "wb")
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror}") from None
        with _Output(file, path) as out:
            yield out
        return
    target = os.path.realpath(path)  # a symlink's target: the link stays as it is
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise UsageError(f"no such directory: {directory}")
    try:
        handle, partial = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".partial", dir=directory)
    except OSError as exc:  # read-only, or not ours to write in
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with _Output(os.fdopen(handle, "wb"), path) as out:
            yield out
        os.chmod(partial, 0o666 & ~_umask())  # as open() would have made it; mkstemp makes it private
        os.replace(partial, target)
    except BaseException:
        os.unlink(partial)
        raise


class _Output:
    """A binary file whose write errors (a full disk, a reader gone) are a
    `FileError` naming it, which the command reports in one line."""

    def __init__(self, file: BinaryIO, name: str):
        self._file = file
        self._name = name

    def write(self, data: bytes) -> None:
        with self._reported():
            self._file.write(data)

    def flush(self) -> None:
        with self._reported():
            self._file.flush()

    def __enter__(self) -> "_Output":
        return self

    def __exit__(self, *exc) -> None:
        with self._reported():
            self._file.close()  # flushes: the last write's error may show only here

    @contextmanager
    def _reported(self):
        try:
            yield
        except OSError as exc:
            raise FileError(f"cannot write {self._name}: {exc.strerror or exc}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def progress(description: str, total: Optional[Callable[[], Optional[int]]] = None, unit: str = "rows"):
    """A progress bar (count and rate) on standard error when it is a
    terminal; yields the function to call with each step's count. `total`
    is asked only then."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda n: None
        return
    if unit == "bytes":
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), TimeElapsedColumn()]
    else:
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn(unit), _RowRate(unit), TimeElapsedColumn()]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(description, total=total() if total else None)
        yield lambda n: bar.advance(task, n)


class _RowRate(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self._unit = unit

    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} {self._unit}/s" if task.speed else "")


def run_import(args) -> int:
    # Imported here: `routelens export` needs none of the ingest path (some 8 MB resident).
    from ..ingest.importer import import_files
    from ..ingest.writer import Ingestor

    missing = [path for path in args.files if not os.path.isfile(path)]
    if missing:
        raise UsageError(f"no such file: {', '.join(missing)}")
    engine = make_engine(args.db)
    tune_gc_for_bulk_work()
    try:
        check_schema(engine, args.db)
        # Bytes read are inflated bytes: for gzip files, the total is unknown.
        total = None if any(p.endswith(".gz") for p in args.files) else sum(map(os.path.getsize, args.files))
        with progress("importing", lambda: total, unit="bytes") as advance:
            report = import_files(Ingestor(engine), args.files, args.max_events, on_line=advance)
    finally:
        engine.dispose()
    for problem in report.problems:
        print(f"routelens import: {problem}", file=sys.stderr)
    print(f"routelens import: {report.batches} batches, {report.stored} events stored, "
          f"{report.duplicates} already there, {len(report.problems)} bad lines", file=sys.stderr)
    return 1 if report.problems else 0
