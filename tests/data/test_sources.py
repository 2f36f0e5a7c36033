"""Reading rows: line numbers in JSON lines, JSON arrays, CSV and parquet files, dataset folders, and bad rows
skipped and counted."""

import pytest

from lit_rlhf.data.errors import DataFormatError
from lit_rlhf.data.preferences import read_preferences
from lit_rlhf.data.rows import PreferenceExample
from lit_rlhf.data.sources import iter_rows
from tests.data.test_support import write_jsonl


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
