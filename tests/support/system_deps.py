"""What tests need from the machine (PostgreSQL, Chromium): a test may skip
without it on a laptop, never in CI, where it fails (see scripts/system-deps.sh)."""

from __future__ import annotations

import os
from typing import Callable, Type

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(check: Callable[[], None], unavailable: Type[Exception], ci_says: str, skip_says: str) -> None:
    """Run `check`; when it raises `unavailable`, fail the test in CI ("<ci_says>: <why>"), else skip it."""
    try:
        check()
    except unavailable as exc:
        if in_ci():
            pytest.fail(f"{ci_says}: {exc}", pytrace=False)
        pytest.skip(f"{skip_says}: {exc}")
