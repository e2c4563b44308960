"""A bounded on-disk queue of JSON lines: where batches wait while the
collector is unreachable.

Lines are appended to segment files of at most `segment_bytes`; the oldest
segment is read back whole (so memory is bounded by one segment), its lines
handed out oldest first, and the file deleted once every line was delivered.
Nothing here retries or sleeps: the exporter decides when to replay.

Spools live under one directory per collector (`collector_spool_root`),
one spool per process, named `<host>-<pid>-<random>`: a process that finds
the spool of a process of its host that no longer runs adopts it
(`open_collector_spool`), so batches a killed process left are replayed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import uuid
from collections import deque
from typing import Deque, List, Optional

logger = logging.getLogger("routelens")


class SpoolFull(Exception):
    """The line does not fit within `max_bytes`."""


class Spool:
    def __init__(self, directory: str, max_bytes: int, segment_bytes: int = 8 * 1024 * 1024):
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = min(segment_bytes, max_bytes)
        self.bytes = 0  # on disk, delivered lines of the segment being read included
        self._segments: Deque[str] = deque()  # paths, oldest first
        self._next_number = 0
        self._writer: Optional[int] = None  # fd of the newest segment, open for append
        self._writer_bytes = 0
        self._reading: Optional[List[bytes]] = None  # lines of the oldest segment
        self._read_index = 0

    def adopt(self, directory: str) -> int:
        """Take over the segments of another spool (a process that died with
        batches undelivered), ahead of anything this spool holds. Returns how
        many segments were taken; a segment another process took first is skipped."""
        try:
            names = sorted(n for n in os.listdir(directory) if n.endswith(".jsonl"))
        except OSError:
            return 0
        os.makedirs(self.directory, exist_ok=True)
        taken = []
        for name in names:
            path = os.path.join(self.directory, f"{self._next_number:012d}.jsonl")
            try:
                os.rename(os.path.join(directory, name), path)
            except OSError:
                continue
            self._next_number += 1
            self.bytes += os.path.getsize(path)
            taken.append(path)
        self._segments.extendleft(reversed(taken))
        try:
            os.rmdir(directory)
        except OSError:
            pass
        return len(taken)

    def __len__(self) -> int:
        """Number of segments holding undelivered lines."""
        return len(self._segments)

    def append(self, line: bytes) -> None:
        """Store one line. Raises SpoolFull, or OSError when the disk refuses."""
        size = len(line) + 1
        if self.bytes + size > self.max_bytes:
            raise SpoolFull(f"spool at {self.bytes} of {self.max_bytes} bytes")
        if self._writer is None or self._writer_bytes + size > self.segment_bytes:
            self._open_segment()
        written = os.write(self._writer, line + b"\n")
        if written != size:  # disk full: cut the partial line so replay never sees it
            os.ftruncate(self._writer, self._writer_bytes)
            raise OSError(f"short write to spool segment ({written} of {size} bytes)")
        self._writer_bytes += written
        self.bytes += written

    def peek(self) -> Optional[bytes]:
        """The oldest undelivered line, or None when the spool is empty.

        A segment that cannot be read (deleted by a tmp cleaner, say) is
        skipped, so one lost file never blocks the rest: raises OSError once
        for it, naming it.
        """
        while self._segments:
            if self._reading is None:
                try:
                    self._load_oldest()
                except OSError:
                    self._drop_oldest()
                    raise
            if self._read_index < len(self._reading):
                return self._reading[self._read_index]
            self._drop_oldest()
        return None

    def pop(self) -> None:
        """Mark the line returned by `peek` as delivered."""
        self._read_index += 1
        if self._read_index >= len(self._reading):
            self._drop_oldest()

    def _open_segment(self) -> None:
        self._close_writer()
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"{self._next_number:012d}.jsonl")
        self._next_number += 1
        self._writer = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._writer_bytes = 0
        self._segments.append(path)

    def _close_writer(self) -> None:
        if self._writer is not None:
            os.close(self._writer)
            self._writer = None

    def _load_oldest(self) -> None:
        path = self._segments[0]
        if len(self._segments) == 1:
            self._close_writer()  # the next append starts a new segment
        with open(path, "rb") as f:
            data = f.read()
        self._reading = [line for line in data.split(b"\n") if line]
        self._read_index = 0

    def _drop_oldest(self) -> None:
        path = self._segments.popleft()
        try:
            self.bytes -= os.path.getsize(path)
            os.unlink(path)
        except OSError:
            pass
        self._reading = None
        self._read_index = 0
        if not self._segments:
            self.bytes = 0

    def close(self) -> None:
        self._close_writer()


def collector_spool_root(spool_dir: str, collector_url: str) -> str:
    """Where the spools of one collector's batches live: a later process
    adopts only spools meant for the collector it sends to."""
    return os.path.join(spool_dir, "collector-" + hashlib.sha256(collector_url.encode()).hexdigest()[:16])


def orphaned_spools(spool_root: str, host: str) -> List[str]:
    """Spool directories left on this host by processes that no longer run."""
    try:
        names = os.listdir(spool_root)
    except OSError:
        return []
    orphans = []
    for name in sorted(names):
        owner, _, rest = name.rpartition("-")[0].rpartition("-")
        pid = rest if owner == host else ""
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            orphans.append(os.path.join(spool_root, name))
        except OSError:
            pass  # alive, under another user
    return orphans


def open_collector_spool(spool_dir: str, collector_url: str, max_bytes: int) -> Spool:
    """This process's new spool for batches to `collector_url`, holding
    first whatever dead processes of this host left for that collector."""
    host = socket.gethostname()
    spool_root = collector_spool_root(spool_dir, collector_url)
    spool = Spool(os.path.join(spool_root, f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"), max_bytes)
    for orphan in orphaned_spools(spool_root, host):
        if spool.adopt(orphan):
            logger.info("routelens: replaying the spool a dead process left in %s", orphan)
    return spool
