"""The `routelens` command as a user meets it: complete help, and errors that
are one line saying what to do, with no traceback and nothing changed."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

import pytest

from routelens.collector.cli.commands import build_parser

COMMANDS = ["demo", "collector", "up", "db", "db upgrade", "db current", "export", "import", "tail", "replay"]


def routelens(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "routelens.collector.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def one_line(stderr: str) -> bool:
    return stderr.count("\n") == 1 and "Traceback" not in stderr


def test_help_lists_every_command():
    result = routelens("--help")
    assert result.returncode == 0
    for command in ("demo", "collector", "up", "db", "export", "import", "tail", "replay"):
        assert f"\n    {command} " in result.stdout or f"\n    {command}\n" in result.stdout, command


def _commands(parser: argparse.ArgumentParser, path=()):
    """(command path, its parser) for every command and subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*path, name), sub, helps.get(name)
                yield from _commands(sub, (*path, name))


def test_every_command_and_option_is_explained():
    commands = list(_commands(build_parser()))
    assert {" ".join(path) for path, _, _ in commands} == set(COMMANDS)
    for path, parser, summary in commands:
        assert summary and parser.description, path
        for action in parser._actions:
            if action.option_strings:
                assert action.help, (path, action.option_strings)
        result = routelens(*path, "--help")
        assert result.returncode == 0 and result.stdout.startswith(f"usage: routelens {' '.join(path)}")


@pytest.mark.parametrize("command", ["up", "collector"])
def test_a_port_in_use_is_one_line_before_anything_is_announced(command, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = routelens(command, "--db", str(tmp_path / "x.db"), "--port", str(port))
    assert result.returncode == 1
    assert one_line(result.stderr), result.stderr
    assert f"127.0.0.1:{port}" in result.stderr and "--port" in result.stderr
    assert not os.path.exists(tmp_path / "x.db")


@pytest.mark.parametrize("db, message", [
    ("mysql://u@h/d", "unsupported database 'mysql': use SQLite or PostgreSQL"),
    ("postgresql://nobody@127.0.0.1:1/routelens", "cannot open the database"),
])
def test_a_database_that_cannot_be_used_is_one_line(db, message):
    result = routelens("up", "--db", db, "--port", "0")
    assert result.returncode == 1
    assert one_line(result.stderr) and message in result.stderr, result.stderr


def test_exporting_from_a_missing_database_creates_nothing(tmp_path):
    result = routelens("export", "--db", str(tmp_path / "missing.db"), "-o", str(tmp_path / "out.csv"))
    assert result.returncode == 2
    assert one_line(result.stderr) and "no database at" in result.stderr, result.stderr
    assert os.listdir(tmp_path) == []
