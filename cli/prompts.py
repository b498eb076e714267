"""Prompts from the command line: text, a file of lines or JSONL, or comma-separated token ids."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from klotski_tier.cli.progress import items_progress
from klotski_tier.core import reads
from klotski_tier.core.errors import InputError
from klotski_tier.core.units import MIB

Prompt = str | list[int]

PROMPTS_KIND = reads.FileKind("prompts file", 256 * MIB, InputError, "pass a UTF-8 text or JSONL file")
"""256 MiB of prompts is far more than one run can generate from."""
PROGRESS_LINES = 10_000  # JSONL lines read between two updates of the progress line
JSONL_SUFFIXES = (".jsonl", ".json")
"""Suffixes of a prompts file holding one JSON object per line; any other holds one prompt per line."""


def parse_ids(text: str) -> list[int]:
    """``"1, 2,3"`` -> ``[1, 2, 3]``: token ids in ASCII digits; an empty item (``"1,,2"``) is refused,
    not skipped."""
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        raise InputError(f"{text!r} holds no token id; give token ids such as 1,2,3")
    if not all(parts):
        position = parts.index("") + 1
        raise InputError(
            f"{text!r} has an empty item (number {position}); give token ids separated by single commas, "
            "such as 1,2,3"
        )
    if not all(part.isascii() and part.isdigit() for part in parts):  # int() reads "１" and "-1" too
        raise InputError(f"{text!r} is not a comma-separated list of token ids (whole numbers, 0 or more)")
    return [int(part) for part in parts]


def read_prompts_file(path: Path) -> list[Prompt]:
    """Prompts from ``path``: text lines (blank lines skipped) or JSONL objects (with a progress line on
    stderr when there are many: a million lines take a quarter of a minute)."""
    lines = reads.read_text(path, PROMPTS_KIND, encoding="utf-8-sig").splitlines()  # -sig: a BOM is not text
    if path.suffix.lower() in JSONL_SUFFIXES:
        prompts = _jsonl_prompts(path, lines)
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise InputError(f"prompts file {path} holds no prompt")
    return prompts


def _jsonl_prompts(path: Path, lines: list[str]) -> list[Prompt]:
    prompts: list[Prompt] = []
    with items_progress(f"reading {path}") as progress:
        for start in range(0, len(lines), PROGRESS_LINES):
            chunk = enumerate(lines[start : start + PROGRESS_LINES], start + 1)
            prompts.extend(_jsonl_prompt(path, number, line) for number, line in chunk if line.strip())
            progress(min(start + PROGRESS_LINES, len(lines)), len(lines))
    return prompts


def _jsonl_prompt(path: Path, number: int, line: str) -> Prompt:
    """One JSONL line: ``{"prompt": "..."}``, ``{"text": "..."}`` or ``{"prompt_ids": [1, 2]}``."""
    if _deeper_than_allowed(line):
        raise InputError(f"{path}:{number} nests JSON more than {reads.MAX_JSON_DEPTH} levels deep")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path}:{number} is not valid JSON: {exc.msg}: line {number} column {exc.colno}; fix the line"
        ) from exc
    if isinstance(record, dict):
        for key in ("prompt", "text"):
            if isinstance(record.get(key), str):
                return str(record[key])
        ids = record.get("prompt_ids", record.get("ids"))
        if isinstance(ids, list) and ids and all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            return [int(t) for t in ids]
    raise InputError(f'{path}:{number} needs a "prompt" string or a "prompt_ids" list of integers')


def _deeper_than_allowed(line: str) -> bool:
    """Whether the JSON ``line`` nests deeper than :data:`reads.MAX_JSON_DEPTH`; scanned only when it opens
    that many brackets at all (counting is fast, the scan is not: 5 million lines would take minutes)."""
    if line.count("[") + line.count("{") <= reads.MAX_JSON_DEPTH:
        return False
    return reads.json_depth(line.encode("utf-8", "surrogatepass")) > reads.MAX_JSON_DEPTH


def gather_prompts(
    texts: Sequence[str], files: Sequence[Path], id_lists: Sequence[list[int]]
) -> list[Prompt]:
    """The ``--prompt`` texts, then the prompts of each ``--prompts`` file, then the ``--prompt-ids``
    (parsed by :func:`parse_ids`)."""
    prompts: list[Prompt] = list(texts)
    for path in files:
        prompts.extend(read_prompts_file(path))
    prompts.extend(list(ids) for ids in id_lists)
    return prompts
