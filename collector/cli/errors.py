"""The errors a subcommand raises for what it cannot do, which the command reports in one line."""


class UsageError(Exception):
    """A command asked for something it cannot do; the message says what to change."""


class FileError(Exception):
    """A file could not be written or read as asked (a full disk, a reader gone); the message names it and says why."""


class ConnectionFailed(Exception):
    """A collector could not be reached, or refused what was asked; the message says why and what to do."""
