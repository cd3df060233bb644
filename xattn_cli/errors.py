"""Errors the CLI maps to exit codes: `UsageError` → 2 with its one-line message."""


class UsageError(Exception):
    """Bad option, unknown model, unreadable checkpoint: the whole run cannot start."""
