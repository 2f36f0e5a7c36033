"""Reading rows from local files (.jsonl / .json / .csv, optionally .gz, and .parquet), dataset folders and hub
datasets, and parsing them all with one per-row parser that may skip and count bad rows."""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from lit_rlhf.data.errors import ROW, DataFormatError

log = logging.getLogger(__name__)

T = TypeVar("T")


def source_label(source: str | Path, split: str) -> str:
    """How a source appears in error messages: the file path, or ``name[split]`` for ``datasets`` sources."""
    path = Path(source)
    if path.is_file():
        return str(source)
    return f"{source}[{split}]"


def _open_text(path: Path, newline: str) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline=newline)
    return open(path, encoding="utf-8", newline=newline)


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
    A row that cannot be decoded is yielded as a :class:`DataFormatError` so that the caller can skip it; a JSON array
    that is broken is raised at once (nothing after it can be trusted).
    """
    path = Path(source)
    label = source_label(source, split)
    if path.is_file():
        fmt = _format_of(path)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            for i, row in enumerate(pq.read_table(path).to_pylist()):
                yield i + 1, row
            return
        # Only "\n" ends a JSON line: str.splitlines() would also split at U+2028 inside strings and shift lines.
        with _open_text(path, newline="" if fmt == "csv" else "\n") as handle:
            if fmt == "csv":
                yield from _csv_rows(handle, label)
            elif fmt == "jsonl":
                yield from _json_lines(handle, label)
            else:
                text = handle.read()
                rows = _json_array_rows(text, label) if text.lstrip().startswith("[") else _json_lines(text, label)
                yield from rows
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


def _json_lines(lines: Iterable[str] | str, label: str) -> Iterator[tuple[int, dict[str, Any] | DataFormatError]]:
    if isinstance(lines, str):
        lines = lines.split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            yield number, DataFormatError(label, number, ROW, f"invalid JSON ({err.msg} at column {err.colno})")
            continue
        yield number, _row_or_error(value, label, number)


def _json_array_rows(text: str, label: str) -> Iterator[tuple[int, dict[str, Any] | DataFormatError]]:
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


def _csv_rows(handle: io.TextIOBase, label: str) -> Iterator[tuple[int, dict[str, Any] | DataFormatError]]:
    reader = csv.DictReader(handle)
    start = reader.line_num + 2  # the header occupies line 1 and DictReader reads it lazily
    for row in reader:
        if None in row:
            yield start, DataFormatError(label, start, ROW, "more cells than header columns")
        else:
            yield start, row
        start = reader.line_num + 1


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
        The examples and counts: ``rows`` read, ``kept``, ``invalid`` (skipped bad rows) plus the parser's own keys.

    Raises:
        DataFormatError: on the first bad row unless ``skip_invalid``.
    """
    label = source_label(source, split)
    counts: Counter = Counter(rows=0, kept=0, invalid=0)
    examples: list[T] = []
    first_errors: list[str] = []
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
        log.warning("%s: dropped %d of %d rows (%s)%s", label, dropped, counts["rows"], summary, detail)
    if not examples:
        raise ValueError(f"{label}: no usable rows ({summary}).")
    return examples, stats
