"""The error every data reader raises for a bad row: it names the file, the line and the field at fault."""

from __future__ import annotations

ROW = "<row>"
"""Field name used in errors about a whole row (bad JSON, unknown format)."""


class DataFormatError(ValueError):
    """Bad input data; the message starts with ``"{file}:{line}: field '{field}': "``.

    ``line`` is the line where the row starts for JSON lines, JSON arrays and CSV, and the 1-based row number for
    parquet files and ``datasets`` sources; for bytes that are not UTF-8 it is their line, for a ``.gz`` archive that
    breaks off the first line that could not be read, and 1 for a file that is not parquet.
    """

    def __init__(self, file: str, line: int, field: str, reason: str) -> None:
        self.file, self.line, self.field, self.reason = file, line, field, reason
        super().__init__(f"{file}:{line}: field '{field}': {reason}")
