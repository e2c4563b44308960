"""`routelens import`: JSON Lines files of wire-format batches into a database.

The files are what the tracer's local sink writes (one batch per line) or
what `routelens export --what events` wrote. Each line goes through the
same validation (`collector.ingest.schema.parse`) and idempotent write path
(`collector.ingest.writer.Ingestor`) as `POST /v1/events`: a bad line is reported
with its file and line number and stores nothing; the other lines are
stored; importing a file twice stores nothing twice.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterable, List, Optional

from .schema import Invalid, TooMany, parse
from .writer import Ingestor, SourceConflict


@dataclass
class ImportReport:
    batches: int = 0
    stored: int = 0
    duplicates: int = 0
    problems: List[str] = field(default_factory=list)  # "FILE:LINE: what is wrong"


def _open(path: str) -> BinaryIO:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def import_files(ingestor: Ingestor, paths: Iterable[str], max_events: int,
                 on_line: Optional[Callable[[int], None]] = None) -> ImportReport:
    """Store every valid line of the files. `on_line(n_bytes)` is told of each line read."""
    report = ImportReport()
    for path in paths:
        try:
            with _open(path) as lines:
                for number, line in enumerate(lines, start=1):
                    if on_line:
                        on_line(len(line))
                    if line.strip():
                        _import_line(ingestor, line, max_events, f"{path}:{number}", report)
        except (OSError, EOFError, zlib.error) as exc:  # unreadable, not gzip after all, or cut short
            report.problems.append(f"{path}: {getattr(exc, 'strerror', None) or exc or type(exc).__name__}")
    return report


def _import_line(ingestor: Ingestor, line: bytes, max_events: int, where: str, report: ImportReport) -> None:
    try:
        result = ingestor.ingest(parse(line, max_events))
    except (Invalid, TooMany, SourceConflict) as exc:
        report.problems.append(f"{where}: {exc}")
        return
    report.batches += 1
    report.stored += result.stored
    report.duplicates += result.duplicates
