"""Unit tests for routers.spool.Spool, on real files in tmp_path."""

from __future__ import annotations

import os

import pytest

from routelens.routers.spool import Spool, SpoolFull


def _lines(n: int, width: int = 20):
    """n distinct lines of exactly `width` bytes (newline excluded)."""
    return [(b'{"batch":%06d}' % i).ljust(width, b" ") for i in range(n)]


def _drain(spool: Spool):
    """Every line left, oldest first, marking each delivered."""
    out = []
    while (line := spool.peek()) is not None:
        out.append(line)
        spool.pop()
    return out


def _segment_files(directory):
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def _contents(directory):
    """Segment file name -> its bytes."""
    out = {}
    for name in _segment_files(directory):
        with open(os.path.join(directory, name), "rb") as f:
            out[name] = f.read()
    return out


@pytest.fixture
def spool(tmp_path):
    s = Spool(str(tmp_path / "spool"), max_bytes=10_000, segment_bytes=64)
    yield s
    s.close()


def test_empty_spool_peeks_none(spool):
    """A new spool has no line, no segment and no bytes."""
    assert spool.peek() is None
    assert len(spool) == 0
    assert spool.bytes == 0


def test_lines_come_back_in_order_across_segments(spool):
    """Lines spread over several segments are returned oldest first, each once."""
    lines = _lines(10)  # 21 bytes each with newline: 3 per 64-byte segment
    for line in lines:
        spool.append(line)
    assert len(spool) == 4
    assert len(_segment_files(spool.directory)) == 4
    assert _drain(spool) == lines
    assert spool.peek() is None


def test_peek_does_not_consume(spool):
    """peek returns the same line until pop is called."""
    spool.append(b"first")
    spool.append(b"second")
    assert spool.peek() == b"first"
    assert spool.peek() == b"first"
    spool.pop()
    assert spool.peek() == b"second"


def test_segment_files_deleted_once_delivered(spool):
    """A segment's file disappears when its last line is popped, not before."""
    for line in _lines(6):  # two segments of three lines
        spool.append(line)
    first, second = _segment_files(spool.directory)
    for _ in range(2):
        spool.peek()
        spool.pop()
    assert _segment_files(spool.directory) == [first, second]
    spool.peek()
    spool.pop()
    assert _segment_files(spool.directory) == [second]
    assert len(spool) == 1
    _drain(spool)
    assert _segment_files(spool.directory) == []
    assert len(spool) == 0


def test_bytes_accounting(spool):
    """bytes counts lines plus newlines on disk, drops per delivered segment, and ends at 0."""
    lines = _lines(7)
    for line in lines:
        spool.append(line)
    assert spool.bytes == sum(len(line) + 1 for line in lines)
    on_disk = sum(os.path.getsize(os.path.join(spool.directory, f)) for f in _segment_files(spool.directory))
    assert spool.bytes == on_disk
    for _ in range(3):  # the first segment, whole
        spool.peek()
        spool.pop()
    assert spool.bytes == 4 * 21
    _drain(spool)
    assert spool.bytes == 0


def test_spool_full_raises_and_writes_nothing(tmp_path):
    """An append over max_bytes raises SpoolFull and leaves disk and counters unchanged."""
    spool = Spool(str(tmp_path / "s"), max_bytes=50, segment_bytes=64)
    spool.append(b"a" * 29)  # 30 bytes
    spool.append(b"b" * 19)  # 50 bytes: exactly full is allowed
    files_before = _contents(spool.directory)
    with pytest.raises(SpoolFull):
        spool.append(b"c")
    assert _contents(spool.directory) == files_before
    assert spool.bytes == 50
    assert _drain(spool) == [b"a" * 29, b"b" * 19]
    spool.close()


def test_room_is_made_again_once_delivered(tmp_path):
    """After a full spool is drained, appends succeed again."""
    spool = Spool(str(tmp_path / "s"), max_bytes=30, segment_bytes=30)
    spool.append(b"x" * 29)
    with pytest.raises(SpoolFull):
        spool.append(b"y")
    _drain(spool)
    spool.append(b"y")
    assert _drain(spool) == [b"y"]
    spool.close()


def test_lines_never_split_across_segments(spool):
    """Every segment file holds whole lines only, within segment_bytes."""
    lines = [b"L%d:" % i + b"z" * (i % 17) for i in range(40)]
    for line in lines:
        spool.append(line)
    recovered = []
    for name in _segment_files(spool.directory):
        data = _contents(spool.directory)[name]
        assert data.endswith(b"\n")
        assert len(data) <= 64
        recovered.extend(data.split(b"\n")[:-1])
    assert recovered == lines
    assert _drain(spool) == lines


def test_line_larger_than_a_segment_gets_its_own(spool):
    """A line longer than segment_bytes is stored whole in a segment of its own."""
    spool.append(b"small")
    big = b"B" * 200
    spool.append(big)
    spool.append(b"after")
    assert len(_segment_files(spool.directory)) == 3
    assert _drain(spool) == [b"small", big, b"after"]


def test_appends_during_a_read_go_to_a_new_segment(spool):
    """Lines appended while the only segment is being read land in a new segment and come after."""
    spool.append(b"one")
    spool.append(b"two")
    assert spool.peek() == b"one"  # the single segment is now being read
    spool.append(b"three")
    assert len(_segment_files(spool.directory)) == 2
    spool.pop()
    spool.append(b"four")
    assert _drain(spool) == [b"two", b"three", b"four"]
    assert _segment_files(spool.directory) == []
    assert spool.bytes == 0


def test_interleaved_appends_and_reads_keep_fifo_order(spool):
    """Alternating appends and pops still deliver every line exactly once, in order."""
    lines = _lines(30)
    delivered = []
    for i, line in enumerate(lines):
        spool.append(line)
        if i % 3 == 2:
            delivered.append(spool.peek())
            spool.pop()
    delivered.extend(_drain(spool))
    assert delivered == lines
    assert spool.bytes == 0


def test_segment_bytes_capped_by_max_bytes(tmp_path):
    """segment_bytes never exceeds max_bytes."""
    spool = Spool(str(tmp_path / "s"), max_bytes=100, segment_bytes=10_000)
    assert spool.segment_bytes == 100


def test_directory_created_on_first_append(tmp_path):
    """The spool directory (and parents) is created lazily by the first append."""
    directory = tmp_path / "a" / "b"
    spool = Spool(str(directory), max_bytes=1000)
    assert not directory.exists()
    spool.append(b"x")
    assert directory.is_dir()
    spool.close()
