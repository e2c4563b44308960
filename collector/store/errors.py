"""The error the database's code raises when the database cannot be used as it
is: a module of its own, with nothing to import, so that the command can
catch it without importing SQLAlchemy for a subcommand that needs none
(`routelens tail`)."""


class DatabaseError(RuntimeError):
    """The database cannot be used as it is; the message says what to do."""
