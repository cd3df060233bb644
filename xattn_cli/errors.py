"""The two errors the package raises on purpose; the CLI maps them to exit codes and per-item records.

`UsageError` → exit 2 with its one-line message. `ItemError` → one bad input (file, image, region row):
the batch records it and carries on.
"""


class UsageError(Exception):
    """Bad option, unknown model, unreadable checkpoint: the whole run cannot start."""


class ItemError(Exception):
    """A per-item failure (bad, missing or oversized input) that the batch records and moves past."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(error_type, message)  # both in args, so the error pickles across processes
        self.type = error_type
        self.message = message

    def __str__(self) -> str:
        return self.message

    def to_record(self) -> dict[str, str]:
        """The `error` object of an error record in results.jsonl."""
        return {"type": self.type, "message": self.message}
