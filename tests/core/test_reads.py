"""core/reads.py, the one place files are read: every read function refuses, in one line naming the
file, what is not a regular file of bounded size (a FIFO without a writer, /dev/zero, a directory),
a document nested past the bound, and an .npz whose headers declare more than may be allocated."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from klotski_tier.core import reads
from klotski_tier.core.errors import InputError

KIND = reads.FileKind("test file", 4096, InputError, "give a good one")
HINT = "; give a good one"
READERS: dict[str, Callable[[Path], Any]] = {
    "bytes": lambda path: reads.read_bytes(path, KIND),
    "text": lambda path: reads.read_text(path, KIND),
    "json": lambda path: reads.read_json(path, KIND),
    "toml": lambda path: reads.read_toml(path, KIND),
    "npz": lambda path: reads.read_npz(path, KIND, max_array_bytes=1024),
    "check": lambda path: reads.check_file(path, KIND),
}
SEVEN_TIB_SHAPE = (7 * 1024**4 // 8,)  # float64 elements


def _fifo(tmp_path: Path) -> Path:
    os.mkfifo(tmp_path / "fifo")  # no writer: a blocking open or read would never return
    return tmp_path / "fifo"


def _device(tmp_path: Path) -> Path:
    (tmp_path / "zero").symlink_to("/dev/zero")  # endless: a read to EOF would fill memory
    return tmp_path / "zero"


def _directory(tmp_path: Path) -> Path:
    (tmp_path / "dir").mkdir()
    return tmp_path / "dir"


def _too_large(tmp_path: Path) -> Path:
    (tmp_path / "big").write_bytes(b" " * (KIND.max_bytes + 1))
    return tmp_path / "big"


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "absent"


HOSTILE: dict[str, tuple[Callable[[Path], Path], str]] = {
    "fifo": (_fifo, "is a FIFO (named pipe), not a regular file"),
    "dev-zero": (_device, "is a character device, not a regular file"),
    "directory": (_directory, "is a directory, not a regular file"),
    "too-large": (_too_large, "is 4.00 KiB, over the 4.00 KiB limit of a test file"),
    "missing": (_missing, "it does not exist"),
}


def _one_line_error(call: Callable[[], Any], path: Path, phrase: str) -> str:
    with pytest.raises(InputError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and message.endswith(HINT)
    assert phrase in message, message
    return message


@pytest.mark.parametrize("hostile", HOSTILE)
@pytest.mark.parametrize("reader", READERS)
def test_every_reader_refuses_what_it_must_not_read(tmp_path: Path, reader: str, hostile: str) -> None:
    make, phrase = HOSTILE[hostile]
    path = make(tmp_path)
    _one_line_error(lambda: READERS[reader](path), path, phrase)


def test_the_size_limit_is_in_the_message(tmp_path: Path) -> None:
    big = _too_large(tmp_path)
    (tmp_path / "big").write_bytes(b" " * (3 * 4096))
    message = _one_line_error(lambda: reads.read_bytes(big, KIND), big, "is 12.00 KiB")
    assert "over the 4.00 KiB limit" in message


def test_a_file_at_the_limit_and_a_symlink_to_a_file_are_read(tmp_path: Path) -> None:
    (tmp_path / "full").write_bytes(b"x" * KIND.max_bytes)
    (tmp_path / "link").symlink_to(tmp_path / "full")
    assert reads.read_bytes(tmp_path / "link", KIND) == b"x" * KIND.max_bytes


def test_text_that_is_not_utf8_names_the_offset(tmp_path: Path) -> None:
    (tmp_path / "latin1").write_bytes(b"caf\xe9")
    path = tmp_path / "latin1"
    _one_line_error(lambda: reads.read_text(path, KIND), path, "is not UTF-8 text (invalid byte at offset 3)")
    _one_line_error(lambda: reads.read_json(path, KIND), path, "is not UTF-8 text")


def test_deep_json_is_refused_before_the_parser_recurses(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    deep = reads.FileKind("test file", 1024**2, InputError, "give a good one")
    _one_line_error(
        lambda: reads.read_json(path, deep), path, "nests JSON 100000 levels deep, more than the 64"
    )
    unclosed = b"{" * 100_000  # not even valid JSON: still no RecursionError
    with pytest.raises(InputError, match="100000 levels deep"):
        reads.parse_json(unclosed, path, deep)


def test_json_at_the_depth_bound_is_read_and_brackets_in_strings_do_not_count(tmp_path: Path) -> None:
    depth = reads.MAX_JSON_DEPTH
    nested = "[" * (depth - 1) + '"[[[[{{\\"[[["' + "]" * (depth - 1)
    value = reads.parse_json(nested, tmp_path, KIND)
    for _ in range(depth - 1):
        (value,) = value
    assert value == '[[[[{{"[[['
    assert reads.json_depth(b'{"a": [1, {"b": "]]]]"}]}') == 3
    with pytest.raises(InputError, match=f"{depth + 1} levels deep"):
        reads.parse_json("[" * (depth + 1) + "]" * (depth + 1), tmp_path, KIND)


def test_deep_toml_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "deep.toml"
    path.write_text("a = " + "[" * 3000 + "]" * 3000 + "\n")
    deep = reads.FileKind("test file", 1024**2, InputError, "give a good one")
    _one_line_error(lambda: reads.read_toml(path, deep), path, "nests TOML arrays or tables too deep")
    path.write_text("[table\n")
    _one_line_error(lambda: reads.read_toml(path, deep), path, "is not valid TOML")


def test_toml_after_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """A config saved by a Windows editor once failed with "Invalid statement (at line 1, column 1)"."""
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf[pipeline]\nbatches = 2\n")
    assert reads.read_toml(path, KIND) == {"pipeline": {"batches": 2}}


def _npz_with_header(path: Path, shape: tuple[int, ...], dtype: str = "<f8", data: bytes = b"") -> Path:
    """An .npz whose one member's header declares ``shape`` of ``dtype`` but holds ``data`` only."""
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": dtype, "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("routes.npy", member.getvalue() + data)
    return path


def test_an_npz_header_claiming_seven_tib_is_refused_before_allocation(tmp_path: Path) -> None:
    path = _npz_with_header(tmp_path / "huge.npz", SEVEN_TIB_SHAPE)
    message = _one_line_error(
        lambda: reads.read_npz(path, KIND, max_array_bytes=1024), path, "declares array routes as float64"
    )
    assert "(7168.00 GiB), over the 1.00 KiB an array may hold" in message


def test_an_npz_of_objects_or_of_other_members_is_refused(tmp_path: Path) -> None:
    path = _npz_with_header(tmp_path / "objects.npz", (1,), dtype="|O")
    message = _one_line_error(
        lambda: reads.read_npz(path, KIND, max_array_bytes=1024), path, "declares array"
    )
    assert (
        "array routes [1] with dtype object (Python objects, never unpickled); expected integers" in message
    )
    assert "an array may hold" not in message
    with zipfile.ZipFile(tmp_path / "other.npz", "w") as archive:
        archive.writestr("notes.txt", "hello")
    other = tmp_path / "other.npz"
    _one_line_error(lambda: reads.read_npz(other, KIND, max_array_bytes=1024), other, "not up to 64 .npy")
    truncated = _npz_with_header(tmp_path / "short.npz", (16,), data=bytes(8))
    _one_line_error(
        lambda: reads.read_npz(truncated, KIND, max_array_bytes=1024), truncated, "is not a readable .npz"
    )


def test_a_good_npz_round_trips(tmp_path: Path) -> None:
    arrays = {"routes": np.arange(12, dtype=np.int16).reshape(3, 4), "meta": np.array("{}")}
    np.savez_compressed(tmp_path / "good.npz", **arrays)
    loaded = reads.read_npz(
        tmp_path / "good.npz", reads.FileKind("x", 2**20, InputError, "-"), max_array_bytes=96
    )
    assert set(loaded) == {"routes", "meta"} and np.array_equal(loaded["routes"], arrays["routes"])
    assert str(loaded["meta"]) == "{}"
