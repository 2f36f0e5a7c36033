"""Helpers shared by the data tests (no tests here): example files, JSON-lines and raw-bytes writers, a gzip cutter,
character tokenizer ids."""

import gzip
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


def write_bytes(path: Path, lines: list[bytes]) -> Path:
    """Write raw lines (bytes that need not be UTF-8), each ended by b"\\n"; gzipped when the name ends in ``.gz``."""
    data = b"".join(line + b"\n" for line in lines)
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
    return path


def cut_in_half(source: Path, dest: Path) -> Path:
    """Copy the first half of ``source``'s bytes to ``dest``: a ``.gz`` archive that ends early."""
    data = source.read_bytes()
    dest.write_bytes(data[: len(data) // 2])
    return dest
