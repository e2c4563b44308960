"""The `routelens` command.

The command comes with every install, but all it runs (the collector, the
dashboard, export, the demo) needs the server extra; the Ray image's
`pip install routelens` has only the tracer. Without the extra, the command
says in one line what to install instead of printing an import traceback.
"""

from __future__ import annotations

import sys
from typing import List, Optional

# Top-level import names of the server extra's packages (pyproject.toml).
SERVER_MODULES = frozenset({
    "a2wsgi", "adbc_driver_manager", "adbc_driver_sqlite", "aiohttp", "alembic", "dash", "fastapi",
    "msgspec", "nanoarrow", "numpy", "plotly", "prometheus_client", "psycopg", "pyarrow", "pydantic",
    "rich", "sqlalchemy", "starlette", "uvicorn",
})


def main(argv: Optional[List[str]] = None) -> int:
    try:
        from .commands import run
        return run(argv)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in SERVER_MODULES:
            raise
        print(f"routelens: {exc.name} is not installed; the collector, dashboard, export and demo need "
              f'the server extra: pip install "routelens[server]"', file=sys.stderr)
        return 2
