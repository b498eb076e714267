"""Prompt parsing of the command line: comma-separated ids, text files and JSONL files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from klotski_tier.cli import progress
from klotski_tier.cli.prompts import gather_prompts, parse_ids, read_prompts_file
from klotski_tier.core import reads
from klotski_tier.core.errors import InputError

UTF8_BOM = "\ufeff"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- --prompt-ids ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ids"),
    [("1,2,3", [1, 2, 3]), (" 1 , 2,3 ", [1, 2, 3]), ("7", [7]), ("0", [0])],
)
def test_parse_ids(text: str, ids: list[int]) -> None:
    assert parse_ids(text) == ids


@pytest.mark.parametrize(("text", "number"), [("1,,2", 2), ("1,2,", 3), (",1", 1), ("1, ,2", 2)])
def test_parse_ids_refuses_an_empty_item(text: str, number: int) -> None:
    with pytest.raises(InputError, match=f"has an empty item \\(number {number}\\); give token ids"):
        parse_ids(text)


@given(st.lists(st.integers(min_value=0, max_value=10**9), min_size=1))
def test_parse_ids_round_trips(ids: list[int]) -> None:
    assert parse_ids(",".join(map(str, ids))) == ids


@pytest.mark.parametrize("text", ["1,x", "1.5", "a", "1;2", "0x10", "１,2", "-1", "1_000", "٣"])
def test_parse_ids_refuses_anything_but_ascii_whole_numbers(text: str) -> None:
    with pytest.raises(InputError, match="not a comma-separated list of token ids") as info:
        parse_ids(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("text", ["", ",", " , "])
def test_parse_ids_refuses_an_empty_list(text: str) -> None:
    with pytest.raises(InputError, match="holds no token id"):
        parse_ids(text)


# --- text files -----------------------------------------------------------------------------


def test_text_file_one_prompt_per_line_blank_lines_skipped(tmp_path: Path) -> None:
    path = write(tmp_path / "prompts.txt", "first line\n\n   \nsecond, with {braces}\r\n\tthird\n")
    assert read_prompts_file(path) == ["first line", "second, with {braces}", "\tthird"]


def test_text_file_keeps_json_looking_lines_as_text(tmp_path: Path) -> None:
    path = write(tmp_path / "prompts.txt", '{"prompt_ids": [1, 2]}\n')
    assert read_prompts_file(path) == ['{"prompt_ids": [1, 2]}']


def test_a_leading_byte_order_mark_is_not_part_of_the_prompt(tmp_path: Path) -> None:
    assert read_prompts_file(write(tmp_path / "p.txt", UTF8_BOM + "hello\n")) == ["hello"]
    assert read_prompts_file(write(tmp_path / "p.jsonl", UTF8_BOM + '{"prompt": "hi"}\n')) == ["hi"]


def test_non_ascii_text_is_read_as_utf8(tmp_path: Path) -> None:
    assert read_prompts_file(write(tmp_path / "p.txt", "Zürich, 東京\n")) == ["Zürich, 東京"]


def test_a_file_of_blank_lines_holds_no_prompt(tmp_path: Path) -> None:
    path = write(tmp_path / "prompts.txt", "\n \n\t\n")
    with pytest.raises(InputError, match="holds no prompt"):
        read_prompts_file(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"cannot read prompts file .*missing\.txt: it does not exist"):
        read_prompts_file(tmp_path / "missing.txt")


def test_a_directory_is_not_a_prompts_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a directory, not a regular file"):
        read_prompts_file(tmp_path)


def test_invalid_utf8_names_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"ok\n\xc3\x28\n")
    with pytest.raises(InputError, match=r"not UTF-8 text \(invalid byte at offset 3\)"):
        read_prompts_file(path)


# --- JSONL files ----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".JSONL"])
def test_jsonl_variants(tmp_path: Path, suffix: str) -> None:
    records = [
        {"prompt": "a text"},
        {"text": "another text", "id": 7},
        {"prompt_ids": [1, 2, 3]},
        {"ids": [4]},
        {"prompt": "text wins", "prompt_ids": [9]},
    ]
    path = write(tmp_path / f"prompts{suffix}", "\n".join(map(json.dumps, records)) + "\n\n")
    assert read_prompts_file(path) == ["a text", "another text", [1, 2, 3], [4], "text wins"]


def test_jsonl_error_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", '{"prompt": "a"}\n\n{"prompt": \n')
    with pytest.raises(InputError, match=r"p\.jsonl:3 is not valid JSON"):
        read_prompts_file(path)


def test_a_truncated_jsonl_line_gives_its_line_and_column_and_what_to_do(tmp_path: Path) -> None:
    path = write(tmp_path / "trunc.jsonl", '{"prompt": "a"}\n{"prompt": "hello')
    message = (
        r"trunc\.jsonl:2 is not valid JSON: Unterminated string starting at: line 2 column 12; fix the line$"
    )
    with pytest.raises(InputError, match=message):
        read_prompts_file(path)


def test_a_jsonl_line_nested_100000_deep_is_one_line(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", '{"prompt": "a"}\n' + '{"prompt": ' * 100_000 + "\n")
    with pytest.raises(InputError, match=r"p\.jsonl:2 nests JSON more than 64 levels deep"):
        read_prompts_file(path)


def test_a_shallow_jsonl_line_is_not_scanned_for_depth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counting brackets settles most lines: the exact scan took minutes over 5 million of them."""
    monkeypatch.setattr(reads, "json_depth", lambda data: pytest.fail("scanned a line that cannot be deep"))
    path = write(tmp_path / "p.jsonl", '{"prompt": "[[[[ not brackets"}\n{"prompt_ids": [1, 2]}\n')
    assert read_prompts_file(path) == ["[[[[ not brackets", [1, 2]]


def test_reading_many_jsonl_lines_shows_progress_and_a_few_do_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "p.jsonl", "".join(f'{{"prompt_ids": [1, {i}]}}\n' for i in range(30)))
    assert len(read_prompts_file(path)) == 30
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "LONG_PASS_ITEMS", 20)  # 30 lines are then many
    assert len(read_prompts_file(path)) == 30
    assert f"reading {path}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "line",
    [
        "[1, 2, 3]",
        '"just a string"',
        "{}",
        '{"prompt": 5}',
        '{"prompt_ids": []}',
        '{"prompt_ids": [1, "2"]}',
        '{"prompt_ids": [1.5]}',
        '{"prompt_ids": [true, false]}',
        '{"prompt_ids": "1,2"}',
    ],
)
def test_jsonl_records_without_a_usable_prompt(tmp_path: Path, line: str) -> None:
    path = write(tmp_path / "p.jsonl", '{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(InputError, match=r'p\.jsonl:2 needs a "prompt" string or a "prompt_ids" list'):
        read_prompts_file(path)


def test_jsonl_file_of_blank_lines_holds_no_prompt(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="holds no prompt"):
        read_prompts_file(write(tmp_path / "p.jsonl", "\n\n"))


# --- all together ---------------------------------------------------------------------------


def test_gather_prompts_orders_texts_then_files_then_ids(tmp_path: Path) -> None:
    first = write(tmp_path / "a.txt", "from a\n")
    second = write(tmp_path / "b.jsonl", '{"prompt_ids": [8, 9]}\n')
    prompts = gather_prompts(["typed"], [first, second], [[1, 2], [3]])
    assert prompts == ["typed", "from a", [8, 9], [1, 2], [3]]


def test_gather_prompts_of_nothing_is_empty() -> None:
    assert gather_prompts([], [], []) == []


def test_gather_prompts_stops_at_the_first_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="missing"):
        gather_prompts(["fine"], [tmp_path / "missing.txt"], ["1,x"])
