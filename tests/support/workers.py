"""The worker processes of `routelens collector --workers N`, seen from
outside through Linux's /proc: which processes they are, which one holds a
connection, and a connection to each of them (the tests and the ingest
benchmark send to chosen workers; the kernel alone would pick for them)."""

from __future__ import annotations

import http.client
import os
from typing import Dict, List, Optional


def children(pid: int) -> List[int]:
    """The processes whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except OSError:  # gone meanwhile
                continue
    return found


def worker_pids(supervisor: int) -> List[int]:
    """The worker processes of a `--workers N` command (uvicorn spawns them;
    multiprocessing's resource tracker is a child too, and no worker)."""
    pids = []
    for pid in children(supervisor):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"spawn_main" in cmdline.read():
                    pids.append(pid)
        except OSError:
            continue
    return sorted(pids)


def owner(connection: http.client.HTTPConnection, pids: List[int]) -> Optional[int]:
    """The process among `pids` that holds the server's end of `connection`."""
    client_port = connection.sock.getsockname()[1]
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                local, remote = fields[1], fields[2]
                if int(local.rsplit(":", 1)[1], 16) == connection.port and \
                        int(remote.rsplit(":", 1)[1], 16) == client_port:
                    inode = fields[9]
    if inode is None:
        return None
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
        except OSError:  # a descriptor closed meanwhile
            continue
    return None


def connection_to_each(port: int, pids: List[int], tries: int = 500) -> Dict[int, http.client.HTTPConnection]:
    """An open keep-alive connection to each worker: new connections until
    every worker has accepted one (a GET /healthz makes a worker accept it).
    uvicorn closes a connection idle for 5 s: use them at once."""
    found: Dict[int, http.client.HTTPConnection] = {}
    for _ in range(tries):
        if len(found) == len(pids):
            return found
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        connection.request("GET", "/healthz")
        connection.getresponse().read()
        pid = owner(connection, pids)
        if pid is None or pid in found:
            connection.close()
        else:
            found[pid] = connection
    for connection in found.values():
        connection.close()
    raise RuntimeError(f"{tries} connections reached only workers {sorted(found)} of {pids}")
