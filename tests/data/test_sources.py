"""Reading rows: line numbers in JSON lines, JSON arrays, CSV and parquet files, dataset folders, bad rows skipped
and counted, and bytes that are not text (not UTF-8, a ``.gz`` archive that ends early, not parquet)."""

import csv
import hashlib
import io
import json
import logging
import re
import zlib

import pytest

from lit_rlhf.data.errors import DataFormatError
from lit_rlhf.data.preferences import read_preferences
from lit_rlhf.data.rows import PreferenceExample
from lit_rlhf.data.sources import iter_rows
from tests.data.test_support import HH_DEV, cut_in_half, write_bytes, write_jsonl


def test_hh_without_assistant_turn_names_file_line_field(tmp_path):
    # U+2028 is a line break to str.splitlines() but not to JSON lines: it must not shift the line count.
    good = {"chosen": "\n\nHuman: a\u2028\n\nAssistant: b", "rejected": "\n\nHuman: a\u2028\n\nAssistant: c"}
    bad = {"chosen": "\n\nHuman: only a question", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, "", bad])  # line 2 blank, so the bad row is on line 3
    with pytest.raises(DataFormatError) as info:
        read_preferences(path)
    assert str(info.value).startswith(f"{path}:3: field 'chosen': transcript has no")
    assert (info.value.file, info.value.line, info.value.field) == (str(path), 3, "chosen")


def test_json_array_csv_and_parquet_line_numbers(tmp_path):
    array = tmp_path / "a.json"
    array.write_text('[\n  {"prompt": "p", "chosen": "c", "rejected": "r"},\n\n  {"prompt": "p",\n   "chosen": 1}\n]')
    with pytest.raises(DataFormatError, match=rf"^{array}:4: field 'rejected': missing"):
        read_preferences(array)

    table = tmp_path / "t.csv"
    table.write_text('prompt,chosen,rejected,margin\n"multi\nline",c,r,1\np,c,r,oops\n')
    assert [line for line, _ in iter_rows(table)] == [2, 4]
    with pytest.raises(DataFormatError, match=rf"^{table}:4: field 'margin'"):
        read_preferences(table)

    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({"prompt": ["p", "q"], "chosen": ["c", "c"], "rejected": ["r", "c"]}), parquet)
    stats = {}
    assert read_preferences(parquet, stats=stats) == [PreferenceExample("p", "c", "r")]
    assert stats["identical"] == 1


def test_identical_dropped_and_skip_invalid_counted(tmp_path):
    rows = [
        {"prompt": "p1", "chosen": "a", "rejected": "b"},
        '{"prompt": "p2", "chosen": ',  # broken JSON
        {"prompt": "p3", "chosen": "same", "rejected": "same"},
        {"chosen": "\n\nHuman: no reply turn", "rejected": "\n\nHuman: x"},
        {"prompt": "p5", "chosen": "c", "rejected": "d"},
        [1, 2],  # not an object
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataFormatError, match=rf"^{path}:2: field '<row>': invalid JSON"):
        read_preferences(path)
    stats = {}
    examples = read_preferences(path, skip_invalid=True, stats=stats)
    assert [e.prompt for e in examples] == ["p1", "p5"]
    assert stats == {"rows": 6, "kept": 2, "invalid": 3, "identical": 1, "realigned": 0}


def test_dataset_folder_through_load_dataset(tmp_path):
    folder = tmp_path / "hub_like"
    folder.mkdir()
    rows = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(3)]
    write_jsonl(folder / "train.jsonl", rows)
    stats = {}
    examples = read_preferences(folder, split="train", hub_kwargs={"cache_dir": str(tmp_path / "cache")}, stats=stats)
    assert examples == [PreferenceExample(f"p{i}", "good", "bad") for i in range(3)]
    assert stats["rows"] == 3


def pair(prompt: str, chosen: str = "c") -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": "r"}


def encoded(row: dict) -> bytes:
    return json.dumps(row).encode()


def readable_lines(archive: bytes) -> int:
    """The complete lines a cut gzip archive still holds, counted by zlib alone."""
    return zlib.decompressobj(wbits=31).decompress(archive).count(b"\n")


def at(path, line: int, reason: str) -> str:
    """The start of a DataFormatError's message, as a regex."""
    return re.escape(f"{path}:{line}: field '<row>': {reason}")


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.jsonl.gz", "bad.json"])
def test_a_line_that_is_not_utf8_is_one_bad_row(tmp_path, name):
    # "é" is one column but two bytes, so the column (15) and the byte (16) of the 0xff differ.
    lines = [
        encoded(pair("p1")),
        b'{"prompt": "\xc3\xa9 \xff\xfe", "chosen": "c", "rejected": "r"}',
        encoded(pair("p3")),
    ]
    path = write_bytes(tmp_path / name, lines)
    with pytest.raises(DataFormatError) as info:
        read_preferences(path)
    reason = "not valid UTF-8: byte 0xff at column 15 (byte 16 of the line); re-save the file as UTF-8"
    assert str(info.value) == f"{path}:2: field '<row>': {reason}"
    stats = {}
    assert [e.prompt for e in read_preferences(path, skip_invalid=True, stats=stats)] == ["p1", "p3"]
    assert stats == {"rows": 3, "kept": 2, "invalid": 1, "identical": 0, "realigned": 0}


@pytest.mark.parametrize("name", ["t.csv", "t.csv.gz"])
def test_csv_bytes_that_are_not_utf8(tmp_path, name):
    lines = [b"prompt,chosen,rejected", b'p1,"multi', b'line",r', b"p3,c\xff,r", b"p4,c,r"]
    path = write_bytes(tmp_path / name, lines)
    with pytest.raises(DataFormatError, match="^" + at(path, 4, "not valid UTF-8: byte 0xff at column 5")):
        read_preferences(path)
    stats = {}
    assert [e.prompt for e in read_preferences(path, skip_invalid=True, stats=stats)] == ["p1", "p4"]
    assert (stats["rows"], stats["kept"], stats["invalid"]) == (3, 2, 1)

    header = write_bytes(tmp_path / "h.csv", [b"prompt,ch\xffosen,rejected", b"p,c,r"])
    with pytest.raises(DataFormatError, match="^" + at(header, 1, "in the header: not valid UTF-8: byte 0xff")):
        read_preferences(header, skip_invalid=True)  # every row is named by the header: none can be read


def test_json_array_with_bytes_that_are_not_utf8_raises_at_once(tmp_path):
    lines = [b"[", encoded(pair("p")) + b",", b'  {"prompt": "\xff", "chosen": "c", "rejected": "r"}', b"]"]
    path = write_bytes(tmp_path / "a.json", lines)
    with pytest.raises(DataFormatError, match="^" + at(path, 3, "not valid UTF-8: byte 0xff at column 15")):
        read_preferences(path, skip_invalid=True)


def test_a_file_that_is_not_parquet(tmp_path):
    path = tmp_path / "t.parquet"
    path.write_bytes(b"not a parquet file" * 8)
    with pytest.raises(DataFormatError, match="^" + at(path, 1, "not a readable parquet file: ")):
        read_preferences(path, skip_invalid=True)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_truncated_archive_keeps_the_rows_before_the_break(tmp_path, caplog, fmt):
    # Hex digests hardly compress, so half the archive holds a good part of the 400 rows.
    pairs = [pair(hashlib.sha256(str(i).encode()).hexdigest(), "two\nlines") for i in range(400)]
    if fmt == "jsonl":
        lines = [encoded(row) for row in pairs]
    else:
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, ["prompt", "chosen", "rejected"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(pairs)
        lines = table.getvalue().encode().split(b"\n")[:-1]
    path = cut_in_half(write_bytes(tmp_path / f"full.{fmt}.gz", lines), tmp_path / f"half.{fmt}.gz")
    read = readable_lines(path.read_bytes())
    complete = read if fmt == "jsonl" else (read - 1) // 2  # a CSV row here is two lines, after the header
    reason = f"the gzip archive ends early after line {read} (EOFError: "
    with pytest.raises(DataFormatError, match="^" + at(path, read + 1, reason)):
        read_preferences(path)
    stats = {}
    with caplog.at_level(logging.WARNING, logger="lit_rlhf.data.sources"):
        examples = read_preferences(path, skip_invalid=True, stats=stats)
    assert 0 < complete < 400 and [e.prompt for e in examples] == [row["prompt"] for row in pairs[:complete]]
    assert (stats["rows"], stats["kept"], stats["invalid"]) == (complete + 1, complete, 1)
    assert f"dropped 1 of {complete + 1} rows" in caplog.text and reason in caplog.text


def test_csv_archive_that_ends_inside_a_quoted_field_invents_no_row(tmp_path):
    # A sync flush makes exactly the first row and the first line of the second readable.
    packer = zlib.compressobj(wbits=31)
    head = packer.compress(b'prompt,chosen,rejected\np1,c,r\np2,"two\n') + packer.flush(zlib.Z_SYNC_FLUSH)
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(head)
    assert list(iter_rows(path))[0] == (2, pair("p1"))
    line, error = list(iter_rows(path))[1]
    assert line == 4 and str(error).startswith(f"{path}:4: field '<row>': the gzip archive ends early after line 3")
    assert len(list(iter_rows(path))) == 2  # p2's first line is not a row


@pytest.mark.skipif(not HH_DEV.exists(), reason=f"{HH_DEV} not present")
def test_the_first_half_of_the_hh_dev_archive(tmp_path, caplog):
    path = cut_in_half(HH_DEV, tmp_path / "hh-half.jsonl.gz")
    read = readable_lines(path.read_bytes())
    stats = {}
    with caplog.at_level(logging.WARNING, logger="lit_rlhf.data.sources"):
        examples = read_preferences(path, skip_invalid=True, stats=stats)
    full = read_preferences(HH_DEV)
    assert 0 < len(examples) < len(full) and examples == full[: len(examples)]
    assert (stats["rows"], stats["invalid"]) == (read + 1, 1)
    assert f"{path}:{read + 1}: field '<row>': the gzip archive ends early after line {read}" in caplog.text


def test_the_warning_and_the_no_rows_error_say_why(tmp_path, caplog):
    # Four lines of bad JSON, one good row, then (after a sync flush) the archive stops.
    packer = zlib.compressobj(wbits=31)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(packer.compress(b"{\n" * 4 + encoded(pair("p")) + b"\n") + packer.flush(zlib.Z_SYNC_FLUSH))
    with caplog.at_level(logging.WARNING, logger="lit_rlhf.data.sources"):
        assert read_preferences(path, skip_invalid=True) == [PreferenceExample("p", "c", "r")]
    assert "dropped 5 of 6 rows" in caplog.text  # the first three errors are listed, and the break, which is last
    assert f"; last error: {path}:6: field '<row>': the gzip archive ends early after line 5" in caplog.text

    garbage = tmp_path / "garbage.jsonl.gz"
    garbage.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match=f"no usable rows .*; first error: {garbage}:1: field '<row>': the gzip"):
        read_preferences(garbage, skip_invalid=True)
