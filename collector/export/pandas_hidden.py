"""pyarrow's first conversion of Python values, made with pandas hidden.

pyarrow's first conversion of Python values imports pandas, when installed,
to recognise pandas objects among them: some 40-50 MB resident in a process
that never hands it any (pandas is no dependency of routelens). The export
makes that first conversion with pandas hidden (`convert_first_without_pandas`,
called before the module constants that convert Python values); pyarrow
takes the failed import for "no pandas" and remembers the answer. It still
imports pandas when asked for pandas (to_pandas, from_pandas), after which
it also recognises pandas objects again. A process that imported pandas
already keeps pyarrow's ordinary behaviour.
"""

from __future__ import annotations

import sys

import pyarrow as pa


class _Hidden:
    """An import finder that finds none of the packages it is given: pyarrow
    takes the failed import for "not installed"."""

    def __init__(self, *packages: str):
        self._packages = packages

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self._packages:
            raise ModuleNotFoundError(f"{name} is hidden from pyarrow here: see {__name__}")
        return None


def convert_first_without_pandas() -> None:
    """Make pyarrow's first conversion of Python values, unless pandas is imported already."""
    if "pandas" not in sys.modules:
        hiding = _Hidden("pandas")
        sys.meta_path.insert(0, hiding)
        try:
            pa.array([None])
        finally:
            sys.meta_path.remove(hiding)
