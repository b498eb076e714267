"""The one rule for output files, class by class: regular and new files are replaced atomically (the
symlink followed, the mode the umask's or the old file's), devices and FIFOs are written through,
directories and sockets are refused, two outputs may not be one file, and no temporary file survives
a failure, an interruption at its creation, or a process that died."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from klotski_tier.core import atomic
from klotski_tier.core.atomic import atomic_open, check_output, check_outputs, output_path
from klotski_tier.core.errors import InputError

UMASK = 0o027  # neither 0o022 (the usual) nor 0o077 (what mkstemp's 0600 looks like)


@pytest.fixture
def umask() -> Iterator[int]:
    previous = os.umask(UMASK)
    yield UMASK
    os.umask(previous)


@pytest.fixture
def never_replace(monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that would rename over its target fails the test instead of doing it (e.g. /dev/null)."""

    def refuse(*args: Any) -> None:
        raise AssertionError(f"os.replace{args}: a file that must be written through would be replaced")

    monkeypatch.setattr(atomic.os, "replace", refuse)


def write(path: Path, text: str) -> None:
    with atomic_open(path, what="output") as handle:
        handle.write(text)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# --- regular files: replaced atomically --------------------------------------------------------


def test_a_new_file_gets_the_mode_of_the_umask(tmp_path: Path, umask: int) -> None:
    write(tmp_path / "out.jsonl", "new\n")
    assert (tmp_path / "out.jsonl").read_text() == "new\n"
    assert stat.S_IMODE((tmp_path / "out.jsonl").stat().st_mode) == 0o666 & ~umask


def test_an_existing_file_keeps_its_mode(tmp_path: Path, umask: int) -> None:
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    target.chmod(0o604)
    write(target, "new\n")
    assert target.read_text() == "new\n" and stat.S_IMODE(target.stat().st_mode) == 0o604


def test_a_symlink_is_followed_and_stays_a_link(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "out.jsonl"
    target.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    write(link, "new\n")
    assert link.is_symlink() and target.read_text() == "new\n"
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "real") == []


def test_a_dangling_symlink_creates_its_target(tmp_path: Path) -> None:
    link = tmp_path / "link.jsonl"
    link.symlink_to(tmp_path / "later.jsonl")
    check_output(link)
    write(link, "new\n")
    assert link.is_symlink() and (tmp_path / "later.jsonl").read_text() == "new\n"


def test_a_failure_while_writing_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write("half")
        raise RuntimeError("disk gone")
    assert target.read_text() == "old\n" and leftovers(tmp_path) == []


def test_an_interruption_right_after_the_temporary_is_created_leaves_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C or SIGTERM arriving the instant the temporary file exists: it is removed all the same."""
    real_open = os.open

    def open_then_interrupt(path: Any, flags: int, mode: int = 0o777) -> int:
        fd = real_open(path, flags, mode)
        os.close(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "open", open_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path / "out.jsonl", "new\n")
    assert list(tmp_path.iterdir()) == []


def test_temporaries_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".out.jsonl.{dead.pid}-0123456789abcdef.tmp"
    live = tmp_path / f".out.jsonl.{os.getpid()}-0123456789abcdef.tmp"
    unrelated = tmp_path / f".out.jsonl.{dead.pid}-backup"
    for path in (stale, live, unrelated):
        path.write_text("x")
    write(tmp_path / "out.jsonl", "new\n")
    assert not stale.exists() and live.exists() and unrelated.exists()


# --- devices, FIFOs, our own stdout: written through -------------------------------------------


def test_dev_null_is_written_through(never_replace: None) -> None:
    assert check_output(Path("/dev/null")) is None  # a character device: outputs may share it
    write(Path("/dev/null"), "discarded\n")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_full_device_is_a_one_line_error(never_replace: None) -> None:
    with pytest.raises(InputError, match="cannot write output /dev/full: No space left on device"):
        write(Path("/dev/full"), "x" * 100_000)


def test_a_fifo_is_written_through_to_its_reader(tmp_path: Path, never_replace: None) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader is there before the write
    try:
        write(fifo, "line\n")
        assert os.read(reader, 100) == b"line\n"
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_a_fifo_without_a_reader_is_refused_not_waited_on(tmp_path: Path, never_replace: None) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    check_output(fifo)
    with pytest.raises(InputError, match="nothing reads from it"):
        write(fifo, "line\n")
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_our_own_stdout_file_is_appended_to_not_replaced(tmp_path: Path) -> None:
    """``--output /dev/stdout > out.txt``: the output lands in out.txt after what was printed."""
    code = (
        "from pathlib import Path\n"
        "from klotski_tier.core.atomic import atomic_open\n"
        "print('before')\n"
        "with atomic_open(Path('/dev/stdout')) as handle:\n"
        "    handle.write('output\\n')\n"
        "print('after')\n"
    )
    out = tmp_path / "out.txt"
    with out.open("w") as stdout:
        inode = os.fstat(stdout.fileno()).st_ino
        subprocess.run([sys.executable, "-c", code], stdout=stdout, check=True)
    assert out.read_text() == "before\noutput\nafter\n" and out.stat().st_ino == inode


# --- refused ------------------------------------------------------------------------------------


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"--output .* is a directory"):
        check_output(tmp_path, "--output")
    with pytest.raises(InputError, match="is a directory"):
        write(tmp_path, "x")


def test_a_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        with pytest.raises(InputError, match="is a socket"):
            check_output(path, "--trace")
        with pytest.raises(InputError, match="is a socket"):
            write(path, "x")
    assert stat.S_ISSOCK(path.stat().st_mode)


def test_a_trailing_slash_names_no_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="ends with '/'"):
        output_path(f"{tmp_path}/out/")
    assert output_path(f"{tmp_path}/out") == tmp_path / "out"


def test_a_missing_directory_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"--trace .*directory .*missing does not exist"):
        check_output(tmp_path / "missing" / "t.json", "--trace")


# --- two outputs, one file ----------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink", "existing"])
def test_two_outputs_may_not_be_one_file(tmp_path: Path, spelling: str) -> None:
    first = tmp_path / "x.json"
    second = {"same": first, "dotdot": tmp_path / "sub" / ".." / "x.json", "symlink": tmp_path / "l"}.get(
        spelling, first
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "l").symlink_to(first)
    if spelling == "existing":
        first.write_text("old")
        second = tmp_path / "hard"
        os.link(first, second)
    with pytest.raises(InputError, match="--output and --trace are the same file"):
        check_outputs({"--output": first, "--trace": second})


def test_distinct_files_and_a_shared_dev_null_are_fine(tmp_path: Path) -> None:
    check_outputs({"--output": tmp_path / "a", "--trace": tmp_path / "b", "--record-routing": None})
    check_outputs({"--output": Path("/dev/null"), "--trace": Path("/dev/null")})


# --- an output that is an input -----------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink", "hard link"])
def test_an_output_may_not_be_an_input(tmp_path: Path, spelling: str) -> None:
    read = tmp_path / "prompts.txt"
    read.write_text("hello\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to(read)
    os.link(read, tmp_path / "hard")
    output = {"same": read, "dotdot": tmp_path / "sub" / ".." / "prompts.txt", "symlink": tmp_path / "link"}
    written = output.get(spelling, tmp_path / "hard")
    with pytest.raises(
        InputError, match=re.escape(f"--output {written} is also --prompts {read}, which the command reads")
    ):
        check_outputs({"--output": written}, {"--model": None, "--prompts": [tmp_path / "other", read]})
    assert read.read_text() == "hello\n"


@pytest.mark.parametrize("name", ["config.json", "new.json", "sub/deeper.json"])
def test_an_output_may_not_be_inside_an_input_directory(tmp_path: Path, name: str) -> None:
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (tmp_path / "alias").symlink_to(model)
    with pytest.raises(
        InputError, match=re.escape(f"--trace {tmp_path}/alias/{name} is inside --model {model}")
    ):
        check_outputs({"--trace": tmp_path / "alias" / name}, {"--model": model}, directories={"--model"})


def test_only_a_directory_read_whole_holds_its_files(tmp_path: Path) -> None:
    """A prompts "file" that is a directory is refused when read, not as a home of outputs."""
    check_outputs({"--output": tmp_path / "out.jsonl"}, {"--prompts": [tmp_path]})
    check_outputs(
        {"--output": tmp_path / "out.jsonl"}, {"--model": tmp_path / "absent"}, directories={"--model"}
    )


def test_an_input_updated_in_place_on_purpose_may_be_its_output(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text("{}")
    inputs = {"prefetch.state": state}
    check_outputs({"prefetch.save_state": state}, inputs, updates={"prefetch.save_state": "prefetch.state"})
    with pytest.raises(InputError, match=r"--output .* is also prefetch\.state"):
        check_outputs({"--output": state}, inputs, updates={"prefetch.save_state": "prefetch.state"})


def test_a_symlink_loop_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(
        InputError, match=r"--output .*/a: Too many levels of symbolic links; fix or remove the link$"
    ):
        check_outputs({"--output": tmp_path / "a"})
