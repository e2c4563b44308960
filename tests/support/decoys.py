"""A user's own packages named like routelens' folders, which must change nothing.

Before routelens had one namespace, `pip install routelens` put top-level
packages `routers`, `collector`, `dashboard` and `migrations` into
site-packages; a user's package of the same name in the current directory
(or a Ray job's working_dir) shadowed them. Each decoy here fails on import,
so anything that still reaches for a top-level name fails loudly.
"""

from __future__ import annotations

from pathlib import Path

DECOY_NAMES = ("routers", "collector", "dashboard", "migrations")


def make_decoys(directory: Path) -> Path:
    """`directory` with a decoy package of each name; returns `directory`."""
    for name in DECOY_NAMES:
        package = directory / name
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").write_text(
            f"raise ImportError('a user\\'s own package named {name!s} was imported instead of routelens')\n")
    return directory
