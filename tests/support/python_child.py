"""Python code run in a child interpreter: a clean import state, a chosen
working directory and PYTHONPATH."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def run_python(code: str, cwd, pythonpath=None) -> subprocess.CompletedProcess:
    """Runs `code` (dedented) with `python -c`; its output as text."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
