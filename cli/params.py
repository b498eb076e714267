"""What an option's value may be: the click types of every value the command line parses.

A value is checked where click reads it, so that every malformed one is a usage error: one line
``error: Invalid value for '--device-memory': ... (see 'klotski-tier run --help')`` and exit code 2,
before anything is read or loaded. The rules themselves live with what they govern (sizes in
:mod:`klotski_tier.core.units`, counts in :data:`~klotski_tier.core.runtime.config.COUNT_RANGES`,
token ids in :func:`klotski_tier.cli.prompts.parse_ids`); these types only apply them to the command line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import click

from klotski_tier.cli.prompts import parse_ids
from klotski_tier.core.errors import ConfigError, KlotskiError
from klotski_tier.core.plan.plan_types import check_compression_ratio
from klotski_tier.core.registry import Registry
from klotski_tier.core.runtime.config import ALL_EXPERTS, COUNT_RANGES
from klotski_tier.core.units import format_size, parse_size
from klotski_tier.tiers.device import parse_device

SEED_MAX = 2**64 - 1
"""The largest seed: torch's generators take 64 bits."""


class WholeRange(click.IntRange):
    """A :class:`click.IntRange` of numbers in ASCII digits (``int()`` also reads "１" and "٣")."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.isascii():
            self.fail(f"{value!r} is not a whole number; write it in ASCII digits", param, ctx)
        return super().convert(value, param, ctx)


def whole(min: int | None = None, max: int | None = None) -> WholeRange:
    """A whole number within [min, max] (None: unbounded), written in ASCII digits."""
    return WholeRange(min=min, max=max)


SEED = whole(0, SEED_MAX)


def count(field: str) -> WholeRange:
    """A whole number in the range :data:`COUNT_RANGES` holds for the option ``field``."""
    low, high = COUNT_RANGES[field]
    return whole(low, high)


class _Checked(click.ParamType):  # type: ignore[type-arg]
    """A value parsed by a function of the library; its :class:`KlotskiError` becomes a usage error."""

    def __init__(self, name: str, parse: Callable[[str], Any]) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value  # a default, already parsed
        try:
            return self._parse(value)
        except KlotskiError as exc:
            self.fail(str(exc), param, ctx)


def _size(text: str, minimum: int) -> int:
    try:
        nbytes = parse_size(text, what="")
    except ConfigError as exc:  # the usage error names the option: the message need not
        raise _Malformed(str(exc).lstrip()) from exc
    if nbytes < minimum:
        raise _Malformed(f"{text!r} is less than {format_size(minimum)}; give a size such as 64MiB")
    return nbytes


class _Malformed(KlotskiError):
    """A malformed option value (shown as a usage error, never raised out of this module)."""


def size(minimum: int = 0) -> _Checked:
    """A byte size such as ``512MiB`` or ``8GiB`` (at most 1 EiB), at least ``minimum`` bytes."""
    return _Checked("size", lambda text: _size(text, minimum))


def size_list(minimum: int = 1) -> _Checked:
    """Comma-separated byte sizes, such as ``1MiB,16MiB``."""
    return _Checked("sizes", lambda text: tuple(_size(item, minimum) for item in _items(text, "sizes")))


def count_list(low: int, high: int | None = None) -> _Checked:
    """Comma-separated whole numbers in ``low..high``, such as ``1,2,4``."""

    def parse(text: str) -> tuple[int, ...]:
        numbers = tuple(_whole(item, text) for item in _items(text, "whole numbers"))
        for number in numbers:
            if number < low or (high is not None and number > high):
                allowed = f"{low}..{high}" if high is not None else f">= {low}"
                raise _Malformed(f"{number} in {text!r} is not in {allowed}")
        return numbers

    return _Checked("list", parse)


def _items(text: str, what: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise _Malformed(f"{text!r} has an empty item; write {what} separated by single commas, e.g. 1,2,4")
    return items


def _whole(item: str, text: str) -> int:
    if not (item.isascii() and item.isdigit()):
        raise _Malformed(f"{item!r} in {text!r} is not a whole number; write e.g. 1,2,4")
    return int(item)


def _compression_ratio(text: str) -> float:
    try:
        ratio = float(text) if text.isascii() else math.nan
    except ValueError:
        ratio = math.nan
    if not math.isfinite(ratio):
        raise _Malformed(f"{text!r} is not a number; give a ratio such as 1.3")
    try:
        check_compression_ratio(ratio, what="")
    except ConfigError as exc:
        raise _Malformed(str(exc).lstrip()) from exc
    return ratio


COMPRESSION_RATIO = _Checked("ratio", _compression_ratio)
"""``--compression-ratio``: raw / stored bytes of a compressed store, in the range a store can have."""


def registry_name(registry: Registry[Any]) -> _Checked:
    """The name of a plugin of ``registry`` (a built-in or an installed one)."""

    def known(name: str) -> str:
        registry.get(name)  # an unknown name: the registry's own message, naming the valid ones
        return name

    return _Checked("name", known)


DEVICE = _Checked("device", lambda text: (parse_device(text), text)[1])
"""``--device``: cpu, cuda or cuda:N (whether CUDA is there is checked when the run starts)."""

TOKEN_IDS = _Checked("ids", parse_ids)
"""``--prompt-ids``: comma-separated token ids, such as ``1,2,3``."""


class _PromptText(click.ParamType):  # type: ignore[type-arg]
    """A text prompt: UTF-8 (an argument of other bytes reaches Python as lone surrogates)."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            self.fail(
                f"the prompt is not UTF-8 text (from character {exc.start + 1}); write it in UTF-8, or give "
                "its token ids with --prompt-ids",
                param,
                ctx,
            )
        return text


PROMPT_TEXT = _PromptText()


class HotExperts(click.ParamType):  # type: ignore[type-arg]
    """K: a count of experts (>= 0), or "all"."""

    name = "K|all"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if isinstance(value, int):
            return value
        if value == ALL_EXPERTS:
            return ALL_EXPERTS
        text = str(value).strip()
        number = int(text) if text.isascii() and text.isdigit() else -1
        if number < 0:
            self.fail(f'{value!r} is neither a count of experts (0 or more) nor "{ALL_EXPERTS}"', param, ctx)
        return number


class FiniteFloatRange(click.FloatRange):
    """A :class:`click.FloatRange` that also refuses nan and infinities (``float()`` accepts both)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.isascii():  # float() reads other scripts' digits
            self.fail(f"{value!r} is not a number; write it in ASCII digits", param, ctx)
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def finite_float(
    min: float | None = None, max: float | None = None, *, min_open: bool = False
) -> FiniteFloatRange:
    """A float option within [min, max] that is a number: not nan, not infinite."""
    return FiniteFloatRange(min=min, max=max, min_open=min_open)


class NonEmptyPath(click.Path):
    """click's :class:`click.Path`, refusing an empty path (``Path("")`` is the current directory)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value:
            self.fail("the path is empty; name a file or directory", param, ctx)
        return super().convert(value, param, ctx)
