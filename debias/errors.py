"""Errors that the CLI turns into a one-line message and exit code 2 (no traceback)."""


class DebiasError(Exception):
    """A user-facing error: bad arguments, missing data, unusable files."""

    exit_code = 2


class DataError(DebiasError):
    """The data source cannot be read as asked (missing path, empty folder, unknown column, ...)."""
