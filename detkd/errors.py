"""Errors that reach the user as one line naming the file and the problem."""


class DetkdError(Exception):
    """A user-facing error: one line that names the file and the problem."""


class DataError(DetkdError):
    """A data set that fails its checks; ``report`` holds the full check report."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
