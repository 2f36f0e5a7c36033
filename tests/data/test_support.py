"""Helpers shared by the data tests (no tests here): example files, a JSON-lines writer, character tokenizer ids."""

import json
from pathlib import Path

ROOT = Path(__file__).parents[2]
EXAMPLES = ROOT / "lit_rlhf/data/examples"
HH_DEV = ROOT.parent / "shared/data/hh-rlhf-harmless-dev.jsonl.gz"

# Character tokenizer ids: specials 0-3, then string.printable from 4: "0"-"9" 4-13, "a"-"z" 14-39, "A"-"Z" 40-65,
# 32 punctuation marks 66-97, " " 98, "\n" 100. "<|im_start|>" is 2, "<|im_end|>" (EOS) 3.
A, B, C, D, E, F = 14, 15, 16, 17, 18, 19
U, V, W, X, Y, Z = 34, 35, 36, 37, 38, 39


def write_jsonl(path: Path, rows: list) -> Path:
    """Write one row per line: dicts and lists as JSON, strings as they are (blank or broken lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path
