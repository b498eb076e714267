"""What the hostile-input tests ask of a refused command: one ``error:`` line, no traceback, and exit code 1
for what the command found wrong, 2 for a malformed value on the command line (a usage mistake)."""

from __future__ import annotations

from click.testing import Result


def error_line(result: Result, *, longest: int = 400) -> str:
    """The command's one ``error:`` line: exit code 1, nothing on stdout, no traceback, last on stderr."""
    assert result.exit_code == 1, f"stdout: {result.stdout!r} stderr: {result.stderr!r}"
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.stdout == "" and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.stderr.splitlines()[-1] == line and len(line) < longest
    return line


def usage_line(result: Result, option: str | None) -> str:
    """A usage mistake (about ``option``, if given): exit code 2, nothing on stdout, one line naming the
    option and the help to read."""
    assert result.exit_code == 2, f"stdout: {result.stdout!r} stderr: {result.stderr!r}"
    assert result.stdout == "" and "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    prefix = f"error: Invalid value for '{option}'" if option is not None else "error: "
    assert line.startswith(prefix) and line.endswith(" --help')"), line
    return line
