"""The exceptions gated raises on purpose; anything else is a bug and is logged with a traceback."""


class GatedError(Exception):
    """Base of every error gated raises on purpose."""


class ConfigError(GatedError, ValueError):
    """The configuration is invalid; `problems` lists every finding, one line each."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem(s)")


class DriverError(GatedError, OSError):
    """A reader or output could not be opened or stopped working."""


class Unreachable(GatedError, ConnectionError):
    """The ticketing API did not answer usefully in time: decide offline.

    `unsent`: the request certainly never reached the server (no connection was made). Otherwise
    the server may have acted on it and only its answer was lost.
    """

    def __init__(self, message: str = "", *, unsent: bool = False):
        super().__init__(message)
        self.unsent = unsent


class BackendRejected(GatedError):
    """The API refused the request for good (bad credentials, 4xx): do not retry the same call."""


class StoreError(GatedError, OSError):
    """The SQLite store cannot be written (full disk, read-only, corrupt)."""
