"""Sparse count tables and top-k ranking shared by the learning policies, plus option checks.

A :class:`CountTable` maps a row key (a tuple of ints, e.g. ``(layer,)`` or ``(layer, e_prev)``)
to ``{expert: weight}``. Weights are floats so that policies can forget old observations by
scaling. A table saves itself as flat, equal-length columns of numbers
(``{"frequency_layer": [...], "frequency_expert": [...], "frequency_count": [...]}``): plain lists
that survive JSON and ``numpy.savez`` alike, and load back from either.

Option checks turn a bad constructor argument from a config file into a one-line
:class:`ConfigError` naming the policy, the option, the value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from klotski_tier.core.errors import ConfigError

Row = tuple[int, ...]
"""A table row key: ``(layer,)`` for frequencies, ``(layer, e_prev)`` for layer-to-layer pairs."""

TIE_DIGITS = 12  # scores equal to 12 decimals are ties (sums of normalized floats differ in the last bits)


IntArray = npt.NDArray[np.int64]


NO_EXPERT = -1
"""Padding of :func:`route_array` where tokens selected fewer experts than others; never counted."""


def route_array(routes: Sequence[Sequence[int]] | npt.NDArray[Any]) -> IntArray:
    """``routes`` (per token, its experts) as an int array [N, k], rows of fewer experts padded with
    :data:`NO_EXPERT`; [N, 0] when no token selected anything."""
    if isinstance(routes, np.ndarray) and routes.ndim == 2:
        return routes.astype(np.int64, copy=False)
    rows = [list(experts) for experts in routes]
    width = max((len(row) for row in rows), default=0)
    array = np.full((len(rows), width), NO_EXPERT, dtype=np.int64)
    for index, row in enumerate(rows):
        array[index, : len(row)] = row
    return array


def expert_counts(routes: IntArray) -> dict[int, float]:
    """How many times each expert is selected in ``routes`` [N, k], ids in increasing order."""
    counts = np.bincount(routes[routes != NO_EXPERT])  # [max id + 1]
    experts = np.flatnonzero(counts)
    return dict(zip(experts.tolist(), counts[experts].astype(float).tolist(), strict=True))


def pair_counts(before: IntArray, after: IntArray) -> dict[int, dict[int, float]]:
    """Token by token, how often an expert of ``before`` [N, k1] meets one of ``after`` [N, k2]:
    ``{e_before: {e_after: count}}``."""
    if before.size == 0 or after.size == 0:
        return {}
    span = int(max(before.max(), after.max())) + 1
    both = (before[:, :, None] != NO_EXPERT) & (after[:, None, :] != NO_EXPERT)  # [N, k1, k2]
    codes = (before[:, :, None] * span + after[:, None, :])[both]  # one per pair of real selections
    counts = np.bincount(codes, minlength=span * span).reshape(span, span)  # [E_before, E_after]
    pairs: dict[int, dict[int, float]] = {}
    for e_before, e_after in zip(*np.nonzero(counts), strict=True):
        pairs.setdefault(int(e_before), {})[int(e_after)] = float(counts[e_before, e_after])
    return pairs


def top_k(scores: Mapping[int, float], k: int, exclude: Iterable[int] = ()) -> list[int]:
    """Up to ``k`` experts with positive score, highest first, ties to the lower expert id."""
    skipped = set(exclude)
    ranked = sorted(
        (e for e, score in scores.items() if score > 0 and e not in skipped),
        key=lambda e: (-round(scores[e], TIE_DIGITS), e),
    )
    return ranked[:k]


class CountTable:
    """Row key -> expert id -> weight, saved as columns ``{prefix}_{key name}`` and ``{prefix}_count``."""

    def __init__(self, prefix: str, key_names: Sequence[str]) -> None:
        self.prefix = prefix
        self.key_names = tuple(key_names)
        self._rows: dict[Row, dict[int, float]] = {}

    def add(self, row: Row, experts: Iterable[int], weight: float = 1.0) -> None:
        """Add ``weight`` to each of ``experts`` in ``row`` (an expert listed twice counts twice)."""
        counts = self._rows.setdefault(row, {})
        for expert in experts:
            counts[expert] = counts.get(expert, 0.0) + weight

    def add_counts(self, row: Row, counts: Mapping[int, float], weight: float = 1.0) -> None:
        """Add ``count * weight`` to each expert of ``counts`` in ``row``."""
        weights = self._rows.setdefault(row, {})
        for expert, count in counts.items():
            weights[expert] = weights.get(expert, 0.0) + count * weight

    def row(self, row: Row) -> Mapping[int, float]:
        """The weights of ``row``; empty if never added to."""
        return self._rows.get(row, {})

    def count(self, row: Row, expert: int) -> float:
        return self._rows.get(row, {}).get(expert, 0.0)

    def scale(self, factor: float) -> None:
        """Multiply every weight by ``factor``."""
        for counts in self._rows.values():
            for expert in counts:
                counts[expert] *= factor

    def columns(self, factor: float = 1.0) -> dict[str, list[Any]]:
        """The table (each weight times ``factor``) as flat columns, rows and experts in order."""
        names = [*self.key_names, "expert", "count"]
        columns: dict[str, list[Any]] = {f"{self.prefix}_{name}": [] for name in names}
        for row in sorted(self._rows):
            for expert, weight in sorted(self._rows[row].items()):
                for name, value in zip(names, (*row, expert, weight * factor), strict=True):
                    columns[f"{self.prefix}_{name}"].append(value)
        return columns

    def load_columns(self, owner: str, state: Mapping[str, Sequence[Any]]) -> None:
        """Replace the table by the columns of ``state`` (as :meth:`columns` wrote them); a state
        with none of the table's columns empties it, one with only some of them is refused."""
        keys = [f"{self.prefix}_{name}" for name in (*self.key_names, "expert", "count")]
        missing = [key for key in keys if key not in state]
        if missing and len(missing) < len(keys):
            raise ConfigError(f"{owner} state lacks {', '.join(missing)}; load a state this policy saved")
        columns = [list(state.get(key, ())) for key in keys]
        if len({len(column) for column in columns}) > 1:
            raise ConfigError(
                f"{owner} state columns {', '.join(keys)} differ in length; the saved state is damaged"
            )
        loaded = CountTable(self.prefix, self.key_names)
        try:
            for *row, expert, weight in zip(*columns, strict=True):
                loaded.add(tuple(int(v) for v in row), [int(expert)], float(weight))
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"{owner} state holds a value that is not a number ({exc}); re-save it"
            ) from exc
        self._rows = loaded._rows


def check_range(owner: str, option: str, value: object, low: float, high: float, *, low_open: bool) -> float:
    """``value`` as a float if it is a number in ``(low, high]`` (``[low, high]`` if not ``low_open``)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
        if (low < number if low_open else low <= number) and number <= high:
            return number
    allowed = f"{'(' if low_open else '['}{low}, {high}]"
    raise ConfigError(f"{owner} option {option}={value!r} is out of range; use a number in {allowed}")


def check_count(owner: str, option: str, value: object, minimum: int) -> int:
    """``value`` if it is an int ``>= minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{owner} option {option}={value!r} is out of range; use an integer >= {minimum}")
    return value


def check_state_keys(owner: str, state: Mapping[str, Sequence[Any]], tables: Sequence[CountTable]) -> None:
    """Refuse a saved state with keys none of ``tables`` writes (e.g. another policy's state)."""
    known = {f"{t.prefix}_{name}" for t in tables for name in (*t.key_names, "expert", "count")}
    unknown = sorted(set(state) - known)
    if unknown:
        raise ConfigError(f"{owner} cannot load state keys {unknown}; load a state this policy saved")
