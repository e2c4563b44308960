"""docs/testing-routers.md's worked example, run as written: the doc cannot rot."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "testing-routers.md"


def doc_namespace():
    """Every ```python block of the doc, run in order in one namespace, as a reader would paste them."""
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), re.MULTILINE | re.DOTALL)
    assert blocks, f"no python code blocks in {DOC}"
    namespace = {"__name__": "testing_routers_doc"}
    exec(compile("\n".join(blocks), str(DOC), "exec"), namespace)
    return namespace


EXAMPLE = doc_namespace()
EXAMPLE_TESTS = sorted(name for name, value in EXAMPLE.items() if name.startswith("test_") and callable(value))


def test_the_doc_has_examples():
    assert len(EXAMPLE_TESTS) >= 2, EXAMPLE_TESTS


@pytest.mark.parametrize("name", EXAMPLE_TESTS)
def test_the_worked_example_passes(name, tmp_path):
    test = EXAMPLE[name]
    test(**({"tmp_path": tmp_path} if "tmp_path" in inspect.signature(test).parameters else {}))


def test_the_doc_names_every_public_helper():
    from routelens.routers import testing

    text = DOC.read_text()
    assert all(hasattr(testing, name) for name in testing.__all__)
    missing = [name for name in testing.__all__ if f"`{name}" not in text]
    assert not missing, f"docs/testing-routers.md does not mention {missing}"
    undocumented = [name for name in testing.__all__ if not (getattr(testing, name).__doc__ or "").strip()]
    assert not undocumented, f"no docstring: {undocumented}"
