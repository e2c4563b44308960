"""The long reliability runs stay out of the default run, so that CI stays fast.

Tests marked `reliability_long` (minutes of load, several faults) run only
with `--run-long` or ROUTELENS_LONG=1; each has a short version that always
runs. See docs/reliability.md for the command and the figures measured.
"""

from __future__ import annotations

import os

import pytest


def run_long(config) -> bool:
    # The option is added by tests/conftest.py: pytest asks only initial
    # conftests for options, and this one is not when pytest runs from the root.
    return bool(config.getoption("--run-long", default=False)) or os.environ.get("ROUTELENS_LONG") == "1"


def pytest_collection_modifyitems(config, items):
    if run_long(config):
        return
    skip = pytest.mark.skip(reason="long reliability run: use --run-long or ROUTELENS_LONG=1")
    # This hook sees every item of the session, not only this directory's: the marker decides.
    for item in items:
        if "reliability_long" in item.keywords:
            item.add_marker(skip)
