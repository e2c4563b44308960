"""`routelens export -o` on what users point it at besides a plain file: a
FIFO, a symlink, a device node, a directory, a directory it cannot write.
Special files are written to, never replaced; a symlink keeps pointing where
it pointed; a place it cannot write is one line and changes nothing. Each
runs the real command in a child process on a real SQLite file."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time

import pytest

from routelens.collector.store.db import check_schema, make_engine
from tests.support.collector_app import Collector
from tests.support.system_deps import require
from tests.support.wire_source import WireSource


def routelens(*args: str, **options) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "routelens.collector.cli", *args], capture_output=True,
                          timeout=120, **options)


def one_line(stderr: bytes) -> bool:
    return stderr.count(b"\n") == 1 and b"Traceback" not in stderr


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> str:
    """A SQLite file with a few decisions."""
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'routelens.db'}"
    engine = make_engine(url)
    check_schema(engine, url)
    engine.dispose()
    collector = Collector(url)
    try:
        source = WireSource("s1")
        t0 = time.time() - 60
        decisions = [source.decision(t0 + i, [["r1"], ["r2"]], request_id=f"req-{i}") for i in range(20)]
        collector.store(source.batch(decisions + [source.routed(t0 + i + 0.01, "r1", d)
                                                  for i, d in enumerate(decisions)]))
    finally:
        collector.close()
    return url


@pytest.fixture(scope="module")
def expected(db, tmp_path_factory) -> bytes:
    """The export as a plain file holds it."""
    out = tmp_path_factory.mktemp("plain") / "decisions.csv"
    result = routelens("export", "--db", db, "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out.read_bytes()


def test_a_fifo_receives_the_export(db, expected, tmp_path):
    (tmp_path / "out").mkdir()
    fifo = tmp_path / "out" / "pipe"
    os.mkfifo(fifo)
    # A second name for the FIFO: if the command replaced the first, the
    # reader, still waiting for a writer, is let go through this one.
    second_name = tmp_path / "same-pipe"
    os.link(fifo, second_name)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    result = routelens("export", "--db", db, "-o", str(fifo), "--format", "csv")
    if reader.is_alive():
        os.close(os.open(second_name, os.O_WRONLY | os.O_NONBLOCK))
    reader.join()
    assert result.returncode == 0, result.stderr
    assert received == [expected]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert os.listdir(fifo.parent) == ["pipe"]


def test_a_pipe_given_as_dev_fd_receives_the_export(db, expected):
    """`-o >(cmd)`: the shell passes /dev/fd/N, the write end of a pipe."""
    read_end, write_end = os.pipe()
    received = []
    reader = threading.Thread(target=lambda: received.append(os.fdopen(read_end, "rb").read()))
    reader.start()
    try:
        result = routelens("export", "--db", db, "-o", f"/dev/fd/{write_end}", "--format", "csv",
                           pass_fds=[write_end])
    finally:
        os.close(write_end)
    reader.join(timeout=60)
    assert result.returncode == 0, result.stderr
    assert received == [expected]


def test_a_symlink_is_kept_and_its_target_gets_the_export(db, expected, tmp_path):
    target = tmp_path / "data" / "decisions.csv"
    target.parent.mkdir()
    target.write_bytes(b"the previous export")
    link = tmp_path / "latest.csv"
    link.symlink_to(target)
    result = routelens("export", "--db", db, "-o", str(link))
    assert result.returncode == 0, result.stderr
    assert os.path.islink(link) and os.readlink(link) == str(target)
    assert target.read_bytes() == expected
    assert os.listdir(target.parent) == ["decisions.csv"]


def _device(system_path: str, tmp_path) -> str:
    """A device node like `system_path` (/dev/null, /dev/full). As root, a
    private one with the same device number: a regression replaces it, not
    the system's, that every process on the machine uses. Otherwise the
    system's, which this process could not replace anyway."""
    if os.geteuid() != 0:
        return system_path
    private = tmp_path / os.path.basename(system_path)
    os.mknod(private, 0o666 | stat.S_IFCHR, os.stat(system_path).st_rdev)
    return str(private)


def test_a_device_node_stays_a_device(db, tmp_path):
    device = _device("/dev/null", tmp_path)
    before = os.stat(device)
    result = routelens("export", "--db", db, "-o", device, "--format", "csv")
    assert result.returncode == 0, result.stderr
    after = os.stat(device)
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert set(os.listdir(tmp_path)) <= {"null"}


def test_a_full_device_is_one_line(db, tmp_path):
    device = _device("/dev/full", tmp_path)
    result = routelens("export", "--db", db, "-o", device, "--format", "csv")
    assert result.returncode == 1
    assert one_line(result.stderr) and f"cannot write {device}: No space left on device".encode() in result.stderr, \
        result.stderr
    assert stat.S_ISCHR(os.stat(device).st_mode)
    assert set(os.listdir(tmp_path)) <= {"full"}


@pytest.mark.parametrize("suffix", ["", "/"])
def test_a_directory_is_one_line_and_stays_as_it_was(db, tmp_path, suffix):
    directory = tmp_path / "out.csv"
    directory.mkdir()
    result = routelens("export", "--db", db, "-o", f"{directory}{suffix}", "--format", "csv")
    assert result.returncode == 2
    assert one_line(result.stderr) and b"is a directory" in result.stderr, result.stderr
    assert os.listdir(directory) == []


def test_a_missing_directory_with_a_trailing_slash_is_one_line(db, tmp_path):
    result = routelens("export", "--db", db, "-o", f"{tmp_path}/nowhere/", "--format", "csv")
    assert result.returncode == 2
    assert one_line(result.stderr) and b"no such directory" in result.stderr, result.stderr
    assert os.listdir(tmp_path) == []


def test_a_path_under_a_file_is_one_line(db, tmp_path):
    (tmp_path / "notes.txt").write_bytes(b"notes")
    result = routelens("export", "--db", db, "-o", str(tmp_path / "notes.txt" / "d.csv"))
    assert result.returncode == 2
    assert one_line(result.stderr) and b"Not a directory" in result.stderr, result.stderr
    assert (tmp_path / "notes.txt").read_bytes() == b"notes"


@pytest.fixture
def read_only_directory(tmp_path):
    """A directory this process cannot write in: without write permission, or,
    as root (whom permissions do not stop), a read-only filesystem."""
    directory = tmp_path / "read-only"
    directory.mkdir()
    if os.geteuid() != 0:
        directory.chmod(0o555)
        yield directory
        directory.chmod(0o755)
        return

    def mount_read_only():
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(directory)],
                                capture_output=True, text=True)
        if result.returncode:
            raise OSError(result.stderr.strip() or f"mount exited {result.returncode}")

    require(mount_read_only, OSError, "cannot mount a read-only tmpfs", "mounting a read-only tmpfs as root")
    yield directory
    subprocess.run(["umount", "-l", str(directory)], check=False)


def test_a_read_only_directory_is_one_line(db, read_only_directory):
    result = routelens("export", "--db", db, "-o", str(read_only_directory / "d.csv"))
    assert result.returncode == 2
    assert one_line(result.stderr) and f"cannot write {read_only_directory / 'd.csv'}".encode() in result.stderr, \
        result.stderr
    assert os.listdir(read_only_directory) == []
