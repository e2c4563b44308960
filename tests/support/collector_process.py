"""The real collector (`routelens collector`, or `up`) in a child process, for
tests that kill it (SIGKILL) and start it again on the same port and database:
routelens' own `ServerProcess`, on a free port unless given one."""

from __future__ import annotations

import os
from typing import Optional, Sequence

from routelens.collector.cli.server_process import ServerProcess
from tests.support.ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


class CollectorProcess(ServerProcess):
    """`command`: "collector", or "up" (the dashboard as well); `args`: more
    options (say `--workers 2`; a `--retention` given there wins over "never")."""

    def __init__(self, db_url: str, port: Optional[int] = None, command: str = "collector",
                 args: Sequence[str] = ()):
        super().__init__(db_url, port or free_port(), command, args)
