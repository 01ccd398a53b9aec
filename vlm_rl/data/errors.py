"""DataError: bad input data, named by file, line and field, with what to do about it."""

from __future__ import annotations

from vlm_rl.errors import UserError


class DataError(UserError, ValueError):
    """Bad input data; the message names the file, line and field, and what to do.

    `source` ("file:line"), `field` and `detail` (the message without those two) are kept apart too, so that
    `vlm_rl.data.validate` can list problems by row and field."""

    def __init__(self, message: str, source: str | None = None, field: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.source, self.field = source, field
        self.detail = message if detail is None else detail


def field_error(where: str, field: str, problem: str, fix: str) -> DataError:
    """A DataError at `where` ("file:line") about `field`: "WHERE: field 'F': PROBLEM. FIX"."""
    return DataError(f"{where}: field '{field}': {problem}. {fix}", where, field, f"{problem}. {fix}")


def located_error(where: str, problem: str) -> DataError:
    """A DataError at `where` ("file:line", or a file) that names no field, e.g. a line that is not JSON."""
    return DataError(f"{where}: {problem}", where, None, problem)
