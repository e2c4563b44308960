"""Is a change to routers/ cheaper for Ray? The working tree's tracer against
a git revision's, side by side in one process, in a couple of minutes.

End to end (bench/tracer_overhead.py, part 2), the throughput ratio's noise
between runs (about +-0.015) hides any change worth a few microseconds, and
offline timings with warm caches have pointed the wrong way before. This
runs tracer_overhead's cold request (every hook Ray calls, through Ray's
own code, caches evicted before each half) for both tracers, their
requests interleaved with the plain router's, and prints what each adds
per request and the difference, run by run: a change is real when the
difference keeps its sign over the runs and stands clear of their spread.

The base revision's routers/ (installed as `routelens.routers`) is
extracted with `git archive` and imported under the name `routers_base`, so
both versions live in one process and see the same machine, request by
request. Revisions from before the `routelens` namespace, whose routers/
imported itself as the top-level package `routers`, work too.

    .venv/bin/python bench/tracer_ab.py [--base HEAD] [--runs 5] [--requests 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import io
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile

import tracer_overhead  # this directory is on sys.path when run as a script

from routelens.routers import examples

BASE_PACKAGE = "routers_base"
# Relative imports (`from .mixin import`) need no change. Absolute ones name the
# package as `routelens.routers` or, before the namespace, `routers`:
# `from routers.x import`, `from routers import`, `import routers.x`, `import routers`.
_SELF_IMPORT = re.compile(r"^(\s*)(from|import) (?:routelens\.)?routers\b", re.MULTILINE)


def extract_base(revision: str, into: str) -> None:
    """The revision's routers/ as the package `routers_base` in `into`."""
    archive = subprocess.run(["git", "archive", "--format=tar", revision, "routers"], check=True,
                             capture_output=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    target = os.path.join(into, BASE_PACKAGE)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        for member in tar.getmembers():
            if not member.isfile() or not member.name.endswith(".py"):
                continue
            text = tar.extractfile(member).read().decode()
            path = os.path.join(target, os.path.relpath(member.name, "routers"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(_SELF_IMPORT.sub(rf"\1\2 {BASE_PACKAGE}", text).replace(
                    f"import {BASE_PACKAGE}\n", f"import {BASE_PACKAGE} as routers\n"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="the git revision to compare the working tree with")
    parser.add_argument("--runs", type=int, default=5, help="runs, each timing both tracers")
    parser.add_argument("--requests", type=int, default=3000, help="requests per router per run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="routelens-ab-") as directory:
        extract_base(args.base, directory)
        sys.path.insert(0, directory)
        base = importlib.import_module(f"{BASE_PACKAGE}.examples")  # imports all it needs before the files go
    traced = {"base": base.TracedPowerOfTwoChoicesRequestRouter,
              "working tree": examples.TracedPowerOfTwoChoicesRequestRouter}
    print(f"cold request, added over the plain pow-2 router, us per request ({args.requests} requests each run):")
    print(f"  {'base ' + args.base:>24} {'working tree':>14} {'difference':>12}")
    differences = []
    for _ in range(args.runs):
        added = {label: sum(halves.values())
                 for label, halves in asyncio.run(tracer_overhead.cold_request(args.requests, traced)).items()}
        differences.append(added["working tree"] - added["base"])
        print(f"  {added['base']:24.1f} {added['working tree']:14.1f} {differences[-1]:+12.1f}")
    print(f"  difference: median {statistics.median(differences):+.1f} us per request"
          f" (runs from {min(differences):+.1f} to {max(differences):+.1f})")


if __name__ == "__main__":
    main()
