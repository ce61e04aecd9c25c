"""Errors a user can act on.

`UserError` carries one sentence that says what was wrong and what is accepted; the CLI prints it on one line and
exits with code 2 instead of showing a traceback.
"""


class UserError(Exception):
    """Bad input from the user: a message meant to be read, not a bug."""


class DataError(UserError):
    """A dataset file is missing or malformed; the message names the file and the field."""
