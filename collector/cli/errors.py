"""The error every subcommand raises for a user's mistake."""


class UsageError(Exception):
    """A command asked for something it cannot do; the message says what to change."""
