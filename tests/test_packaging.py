"""How routelens installs: one `routelens` namespace, the tracer without the
server's dependencies, the collector without Ray, no import cycles, and a
user's own packages named like our folders changing nothing."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from routelens.collector.cli import SERVER_MODULES
from routelens.collector.store.db import head_revision
from tests.support.decoys import make_decoys
from tests.support.python_child import run_python

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("routers", "collector", "dashboard", "migrations")


def _source_packages():
    """Every import package of the source tree, as `routelens.<folder>...`."""
    for folder in FOLDERS:
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            yield "routelens." + ".".join(init.parent.relative_to(ROOT).parts)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The project's wheel, built from a copy of the source tree, and unpacked."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"),
                             str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (path,) = (tmp / "dist").glob("routelens-*.whl")
    unpacked = tmp / "unpacked"
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        archive.extractall(unpacked)
    return names, unpacked


def test_the_wheel_installs_one_namespace_and_every_package(wheel):
    names, _ = wheel
    top_level = {name.split("/")[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"routelens"}
    assert "routelens/__init__.py" not in names  # a namespace: other distributions may add to it
    shipped = {name[:-len("/__init__.py")].replace("/", ".") for name in names if name.endswith("/__init__.py")}
    assert shipped == set(_source_packages()), "pyproject.toml's packages must list every package of the tree"


def test_the_wheel_ships_the_migrations(wheel):
    names, _ = wheel
    assert {"routelens/migrations/__init__.py", "routelens/migrations/env.py",
            "routelens/migrations/script.py.mako"} <= names
    assert [n for n in names if n.startswith("routelens/migrations/versions/0001_") and n.endswith(".py")]


def test_the_installed_wheel_can_create_a_database(wheel, empty_db_url, tmp_path):
    """Only the unpacked wheel on the path, in another directory: no source tree to lean on."""
    _, unpacked = wheel
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_python(f"""
        from routelens import migrations
        from routelens.collector.store import db
        assert migrations.__file__.startswith({str(unpacked)!r}), migrations.__file__
        db.upgrade({empty_db_url!r})
        print(db.current_revision(db.make_engine({empty_db_url!r})))
    """, cwd=elsewhere, pythonpath=unpacked)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == head_revision()


def test_the_tracer_needs_only_ray_and_the_server_is_an_extra(wheel):
    names, unpacked = wheel
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    requires = Parser().parsestr((unpacked / metadata).read_text()).get_all("Requires-Dist")
    plain = [r for r in requires if "extra ==" not in r]
    assert [r.split(">")[0].split("<")[0] for r in plain] == ["ray[serve]"]
    server = {r.split(";")[0].split(">")[0].split("[")[0].strip().lower()
              for r in requires if "extra == \"server\"" in r}
    assert {"fastapi", "sqlalchemy", "dash", "pyarrow", "uvicorn"} <= server


def _modules_ray_serve_brings() -> set:
    """Top-level import names of ray[serve] and everything it requires, installed."""
    providers = importlib.metadata.packages_distributions()
    by_distribution = {}
    for module, distributions in providers.items():
        for distribution in distributions:
            by_distribution.setdefault(canonicalize_name(distribution), set()).add(module)
    seen, todo = set(), [("ray", {"serve"})]
    while todo:
        name, extras = todo.pop()
        if canonicalize_name(name) in seen:
            continue
        seen.add(canonicalize_name(name))
        for text in importlib.metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in extras or {""}):
                try:
                    importlib.metadata.distribution(requirement.name)
                except importlib.metadata.PackageNotFoundError:
                    continue
                todo.append((requirement.name, requirement.extras))
    return {module for name in seen for module in by_distribution.get(name, ())}


# The server extra is not installed: its packages that ray[serve] does not bring cannot be imported.
_REFUSE_SERVER_MODULES = textwrap.dedent(f"""
    import sys
    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {sorted(SERVER_MODULES - _modules_ray_serve_brings())!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
    sys.meta_path.insert(0, Refuse())
""")


def test_the_tracer_imports_without_the_server_extra(tmp_path):
    result = run_python(_REFUSE_SERVER_MODULES + textwrap.dedent("""
        from routelens.routers import TracingMixin, stamp_routing_stats
        from routelens.routers.examples import TracedUniformRequestRouter
        from routelens.routers.testing import make_router
        print(TracedUniformRequestRouter.__mro__[1].__name__)
    """), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "TracingMixin"


def test_the_command_says_which_extra_to_install(tmp_path):
    result = run_python(_REFUSE_SERVER_MODULES + textwrap.dedent("""
        from routelens.collector.cli import main
        sys.exit(main(["db", "current", "--db", "x.db"]))
    """), cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("routelens: ") and line.endswith(' need the server extra: pip install "routelens[server]"')


# Collector modules that import Ray, each imported only by a command that needs Ray itself.
RAY_USERS = (
    # The demo's apps and traffic run Ray Serve.
    "routelens.collector.demo.apps", "routelens.collector.demo.traffic",
    # `routelens replay` runs the user's router on the offline harness (routelens.routers.testing) in the
    # command's process; the command imports it only to replay, never the collector or the dashboard.
    "routelens.collector.replay.decisions", "routelens.collector.replay.simulate",
)


def test_the_collector_and_dashboard_never_import_ray(tmp_path):
    """A collector host needs no Ray: every module of theirs imports without it,
    but those of RAY_USERS."""
    modules = [m for m in _all_modules() if m.startswith(("routelens.collector", "routelens.dashboard"))
               and m not in RAY_USERS and not m.endswith("__main__")]
    result = run_python(f"""
        import importlib, sys
        for name in {modules!r}:
            importlib.import_module(name)
        print(sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")))
    """, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_users_packages_named_like_our_folders_change_nothing(tmp_path, db_url, collector, make_source):
    """`routelens export` from a directory holding a user's `collector`, `routers`,
    `dashboard` and `migrations` packages (the demo and a traced Serve deployment
    run with the same decoys: tests/test_demo.py, tests/conftest.py)."""
    source = make_source("s1")
    now = time.time()
    decision = source.decision(now - 60, [["r1", "r2"]])
    collector.store(source.batch([decision, source.routed(now - 60, "r1", decision)]))
    decoys = make_decoys(tmp_path / "project")
    # The decoys first; a PYTHONPATH already set (a worktree's routelens, linked in) is kept after them.
    pythonpath = os.pathsep.join(filter(None, [str(decoys), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath)
    result = subprocess.run([sys.executable, "-m", "routelens.collector.cli", "export", "--db", db_url,
                             "--since", "0", "--format", "jsonl", "-o", "-"],
                            cwd=decoys, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [line.count(decision["id"]) for line in result.stdout.splitlines()] == [1]
    imported = run_python("""
        import routelens.routers, routelens.collector.api.app, routelens.dashboard.up
        print(routelens.routers.__file__)
    """, cwd=decoys, pythonpath=pythonpath)
    assert imported.returncode == 0, imported.stderr
    assert os.path.realpath(imported.stdout.strip()) == str(ROOT / "routers" / "__init__.py")


# --- no import cycles ---

def _all_modules():
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            yield "routelens." + ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _path_of(module: str) -> Path:
    relative = Path(*module.split(".")[1:])
    return ROOT / relative / "__init__.py" if (ROOT / relative).is_dir() else (ROOT / relative).with_suffix(".py")


def _imports(module: str, known: set) -> set:
    """The routelens modules `module` imports, anywhere in it but under `if TYPE_CHECKING:`."""
    path = _path_of(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skipped = {id(node) for node in ast.walk(tree) if isinstance(node, ast.If)
               and "TYPE_CHECKING" in ast.unparse(node.test) for node in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                # `from package import module` imports the module; `from module import name`, the module.
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {name for name in found if name in known and name != module}


def test_there_are_no_import_cycles():
    known = set(_all_modules())
    graph = {module: _imports(module, known) for module in known}
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(module):  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in graph[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(known):
        if module not in index:
            visit(module)
    assert cycles == [], "modules that import each other: " + "; ".join(" <-> ".join(c) for c in cycles)
