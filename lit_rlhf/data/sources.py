"""Reading rows from local files (.jsonl / .json / .csv, optionally .gz, and .parquet), dataset folders and hub
datasets, and parsing them all with one per-row parser that may skip and count bad rows; writing rows as JSON
lines."""

from __future__ import annotations

import csv
import gzip
import json
import logging
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from lit_rlhf.data.errors import ROW, DataFormatError

log = logging.getLogger(__name__)

T = TypeVar("T")


PACKAGE_PREFIX = "lit_rlhf/"
"""Paths that start with it and are not found from the working directory name the installed package's own files
(its example data), so recipes that use them run from any folder."""


def locate(source: str | Path) -> str | Path:
    """``source``, or, for a missing path under ``lit_rlhf/``, the same file inside the installed package."""
    if Path(source).exists() or not str(source).startswith(PACKAGE_PREFIX):
        return source
    packaged = Path(__file__).parents[2] / source
    return packaged if packaged.exists() else source


def source_label(source: str | Path, split: str) -> str:
    """How a source appears in error messages: the file path, or ``name[split]`` for ``datasets`` sources."""
    path = Path(locate(source))
    if path.is_file():
        return str(path)
    return f"{source}[{split}]"


def _open_bytes(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


# What reading a damaged gzip archive raises: cut short, bad header or CRC, or corrupt deflate data.
_ARCHIVE_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def _numbered_lines(path: Path, csv_breaks: bool = False) -> Iterator[tuple[int, bytes | Exception]]:
    """``(line, bytes)`` for each line of a local file, or last ``(line, error)`` where a gzip archive breaks off.

    Only a newline byte ends a line (``csv_breaks`` adds a lone carriage return, as ``open(newline="")`` does), so
    undecodable bytes stay on their own line and the lines after them are still read.
    """
    number = 0
    with _open_bytes(path) as handle:
        try:
            for raw in handle:
                for line in raw.splitlines(keepends=True) if csv_breaks else (raw,):
                    number += 1
                    yield number, line
        except _ARCHIVE_ERRORS as err:
            yield number + 1, err


def _archive_error(
    label: str, line: int, err: Exception, after: str = "the rows before it were read, the rest cannot be"
) -> DataFormatError:
    """The error for a gzip archive that breaks off at ``line``; ``after`` says what became of the rows before it."""
    state = "ends early" if isinstance(err, EOFError) else "is corrupt"
    where, after = (f"after line {line - 1}", after) if line > 1 else ("before its first line", "nothing can be read")
    reason = f"the gzip archive {state} {where} ({type(err).__name__}: {err}); {after}; re-create or re-download it"
    return DataFormatError(label, line, ROW, reason)


def _utf8_error(label: str, data: bytes, err: UnicodeDecodeError, first_line: int = 1) -> DataFormatError:
    """The error for undecodable bytes in ``data`` (a line, or a whole file starting at ``first_line``)."""
    start = data.rfind(b"\n", 0, err.start) + 1
    column = len(data[start : err.start].decode("utf-8")) + 1  # in characters, like the JSON errors' columns
    reason = (
        f"not valid UTF-8: byte 0x{data[err.start]:02x} at column {column} (byte {err.start - start + 1} of the "
        "line); re-save the file as UTF-8"
    )
    return DataFormatError(label, first_line + data.count(b"\n", 0, err.start), ROW, reason)


def _format_of(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    for fmt in ("jsonl", "json", "csv", "parquet"):
        if name.endswith("." + fmt):
            return fmt
    raise ValueError(f"{path}: unknown file type; use .jsonl, .json, .csv or .parquet (.gz allowed for text files).")


def iter_rows(
    source: str | Path, split: str = "train", hub_kwargs: Mapping[str, Any] | None = None
) -> Iterator[tuple[int, dict[str, Any] | DataFormatError]]:
    """Yield ``(line, row)`` from a local file, a local dataset folder, or a hub dataset name.

    Local files: ``.jsonl`` / ``.json`` (JSON lines or one array) / ``.csv`` (optionally ``.gz``) and ``.parquet``;
    ``split`` is ignored for them. Anything else goes to ``datasets.load_dataset(source, split=split, **hub_kwargs)``.
    A row that cannot be decoded (bad JSON, bytes that are not UTF-8) is yielded as a :class:`DataFormatError` so that
    the caller can skip it, and so is the break of a ``.gz`` archive that ends early or is corrupt, after the rows
    before it. A JSON array that is broken, and a parquet file that cannot be read, are raised at once (nothing in
    them can be trusted).
    """
    source = locate(source)
    path = Path(source)
    label = source_label(source, split)
    if path.is_file():
        fmt = _format_of(path)
        if fmt == "parquet":
            yield from _parquet_rows(path, label)
        elif fmt == "csv":
            yield from _csv_rows(_numbered_lines(path, csv_breaks=True), label)
        elif fmt == "jsonl":
            yield from _json_lines(_numbered_lines(path), label)
        else:
            lines = list(_numbered_lines(path))
            data = b"".join(raw for _, raw in lines if isinstance(raw, bytes))
            is_array = data.lstrip().startswith(b"[")
            yield from _json_array_rows(lines, data, label) if is_array else _json_lines(lines, label)
        return
    if not path.exists() and path.name.lower().removesuffix(".gz").endswith((".jsonl", ".json", ".csv", ".parquet")):
        raise FileNotFoundError(f"{source}: no such file.")
    import datasets

    dataset = datasets.load_dataset(str(source), split=split, **dict(hub_kwargs or {}))
    for i, row in enumerate(dataset):
        yield i + 1, dict(row)


def _row_or_error(value: Any, label: str, line: int) -> dict[str, Any] | DataFormatError:
    if isinstance(value, dict):
        return value
    return DataFormatError(label, line, ROW, f"expected a JSON object, got {type(value).__name__}")


def _parquet_rows(path: Path, label: str) -> Iterator[tuple[int, dict[str, Any] | DataFormatError]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except pa.ArrowException as err:
        raise DataFormatError(label, 1, ROW, f"not a readable parquet file: {err}") from None
    for i, row in enumerate(rows):
        yield i + 1, row


def _json_lines(
    lines: Iterable[tuple[int, bytes | Exception]], label: str
) -> Iterator[tuple[int, dict[str, Any] | DataFormatError]]:
    for number, raw in lines:
        if isinstance(raw, Exception):
            yield number, _archive_error(label, number, raw)
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield number, _utf8_error(label, raw, err, number)
            continue
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            yield number, DataFormatError(label, number, ROW, f"invalid JSON ({err.msg} at column {err.colno})")
            continue
        yield number, _row_or_error(value, label, number)


def _json_array_rows(
    lines: list[tuple[int, bytes | Exception]], data: bytes, label: str
) -> Iterator[tuple[int, dict[str, Any] | DataFormatError]]:
    number, last = lines[-1] if lines else (0, b"")
    if isinstance(last, Exception):
        raise _archive_error(label, number, last, "a JSON array cannot be read in part")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _utf8_error(label, data, err) from None
    decoder = json.JSONDecoder()
    pos, line, counted = text.index("[") + 1, 1, 0

    def skip_space(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    while True:
        pos = skip_space(pos)
        line += text.count("\n", counted, pos)
        counted = pos
        if pos < len(text) and text[pos] == "]":
            return
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataFormatError(
                label, err.lineno, ROW, f"invalid JSON array ({err.msg} at column {err.colno})"
            ) from None
        yield line, _row_or_error(value, label, line)
        pos = skip_space(end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            raise DataFormatError(label, line + text.count("\n", counted, pos), ROW, "expected ',' or ']' after a row")


def _csv_rows(
    lines: Iterable[tuple[int, bytes | Exception]], label: str
) -> Iterator[tuple[int, dict[str, Any] | DataFormatError]]:
    undecodable: dict[int, DataFormatError] = {}
    broken: list[DataFormatError] = []

    def text() -> Iterator[str]:
        for number, raw in lines:
            if isinstance(raw, Exception):
                broken.append(_archive_error(label, number, raw))
                return
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                undecodable[number] = _utf8_error(label, raw, err, number)
                # Bad bytes are all >= 0x80, never a comma, quote or newline: escaped, they leave the CSV structure
                # (and so the rows after) intact, and the row that holds them is reported instead of read.
                line = raw.decode("utf-8", "surrogateescape")
            yield line

    def bad_bytes_up_to(line: int) -> list[DataFormatError]:
        return [undecodable.pop(number) for number in sorted(undecodable) if number <= line]

    reader = csv.DictReader(text())
    if reader.fieldnames is not None and (header := bad_bytes_up_to(reader.line_num)):
        raise DataFormatError(label, header[0].line, ROW, f"in the header: {header[0].reason}")
    start = reader.line_num + 1
    for row in reader:
        if broken:  # the archive broke inside this row: the reader returned the part it had, which is not a row
            break
        if bad := bad_bytes_up_to(reader.line_num):
            yield start, bad[0]
        elif None in row:
            yield start, DataFormatError(label, start, ROW, "more cells than header columns")
        else:
            yield start, row
        start = reader.line_num + 1
    if broken:
        yield broken[0].line, broken[0]


def load_examples(
    source: str | Path,
    parse: Callable[[Mapping[str, Any], str, int, Counter], T | None],
    split: str = "train",
    skip_invalid: bool = False,
    hub_kwargs: Mapping[str, Any] | None = None,
    what: str = "rows",
) -> tuple[list[T], dict[str, int]]:
    """Parse every row of ``source`` with ``parse(row, file, line, counts)``; a None result drops the row (the parser
    counts why in ``counts``).

    Returns:
        The examples and counts: ``rows`` read, ``kept``, ``invalid`` (skipped bad rows, the break of a damaged
        ``.gz`` archive among them) plus the parser's own keys.

    Raises:
        DataFormatError: on the first bad row unless ``skip_invalid``.
    """
    label = source_label(source, split)
    counts: Counter = Counter(rows=0, kept=0, invalid=0)
    examples: list[T] = []
    first_errors: list[str] = []
    last_error = ""
    for line, row in iter_rows(source, split, hub_kwargs):
        counts["rows"] += 1
        try:
            if isinstance(row, DataFormatError):
                raise row
            example = parse(row, label, line, counts)
        except DataFormatError as err:
            if not skip_invalid:
                raise
            counts["invalid"] += 1
            if len(first_errors) < 3:
                first_errors.append(str(err))
            last_error = str(err)
            continue
        if example is not None:
            examples.append(example)
    counts["kept"] = len(examples)
    stats = dict(counts)
    summary = ", ".join(f"{key} {value}" for key, value in stats.items())
    log.info("%s: %s %s", label, what, summary)
    dropped = counts["rows"] - counts["kept"]
    if dropped:
        detail = "; first errors: " + " | ".join(first_errors) if first_errors else ""
        if counts["invalid"] > len(first_errors):  # a broken archive is the last error, and a reason to re-fetch
            detail += f"; last error: {last_error}"
        log.warning("%s: dropped %d of %d rows (%s)%s", label, dropped, counts["rows"], summary, detail)
    if not examples:
        reason = f"; first error: {first_errors[0]}" if first_errors else ""
        raise ValueError(f"{label}: no usable rows ({summary}){reason}.")
    return examples, stats


def write_json_lines(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write one JSON object per line (UTF-8, gzip if the name ends in ``.gz``), creating the folder; returns the
    path. The readers above read it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
