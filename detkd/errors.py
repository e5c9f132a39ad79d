"""Errors that reach the user as one line naming the file and the problem."""


class DetkdError(Exception):
    """A user-facing error: one line that names the file and the problem."""


class DataError(DetkdError):
    """A data set that fails its checks; ``report`` holds the full check report."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (its type's name when it has none): what a one-line
    DetkdError quotes of a library's multi-line error."""
    return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
