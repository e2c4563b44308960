"""The errors a subcommand raises for what it cannot do, which the command reports in one line.

A module of its own, with nothing to import: the command catches these
whichever subcommand ran, and a subcommand imports only what it needs
(`routelens tail` neither the database's code nor the server's).
"""


class UsageError(Exception):
    """A command asked for something it cannot do; the message says what to change."""


class FileError(Exception):
    """A file could not be written or read as asked (a full disk, a reader gone); the message names it and says why."""


class ConnectionFailed(Exception):
    """A collector could not be reached, or refused what was asked; the message says why and what to do."""


class ServeError(RuntimeError):
    """The server cannot start; the message says why and what to do."""


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why and what to do."""
