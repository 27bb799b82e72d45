"""User-facing errors: the CLI prints their message (no traceback) and exits with status 2."""


class MarginlabError(Exception):
    """Base of every error caused by the user's input or environment, not by a bug."""


class ConfigError(MarginlabError, ValueError):
    """A configuration value is wrong; the message names the key, the value and what is allowed."""


class DataError(MarginlabError):
    """Data is missing or malformed; the message names the path and how to fix it."""


class TrainingError(MarginlabError):
    """Training cannot go on (e.g. repeated non-finite losses); the message says why."""


class OutputError(MarginlabError):
    """A run's files cannot be written (disk full, no permission, a file in the way); the message names the path."""


class ExportError(MarginlabError):
    """A model cannot be exported faithfully (it cannot be traced, or the written file computes something else)."""
