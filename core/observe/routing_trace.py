"""Routing traces: which experts every token selected, per step and layer, recorded and replayed.

A run fills a :class:`RoutingRecorder` (``run --record-routing FILE``); its
:class:`RoutingTrace` is saved as one compressed ``.npz`` file and read back by
``klotski-tier replay`` to compare policies without running the model.

One step is one forward pass of a batch group (prefill or decode); its tokens are those of all
n batches, in batch order. A step's routes are an int16 array ``[L, T_step, k]``: layer, token,
selection. The file holds::

    meta      JSON string: format tag, format_version, model_type, num_layers, num_experts,
              top_k, hidden_size, expert_bytes
    routes    int16 [L, T_total, k]   every step's routes concatenated along the token axis
    offsets   int64 [S + 1]           step s owns tokens offsets[s]:offsets[s+1]
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from klotski_tier.core import reads
from klotski_tier.core.atomic import atomic_open
from klotski_tier.core.errors import ConfigError, InputError
from klotski_tier.core.model.spec import ModelSpec
from klotski_tier.core.units import GIB

logger = logging.getLogger(__name__)

FORMAT_TAG = "klotski-routing-trace"
"""The ``format`` value in a trace's meta: tells a trace from any other ``.npz``."""
FORMAT_VERSION = 1
"""The trace layout this code writes and reads."""
ROUTE_DTYPE = np.int16
"""Expert ids on disk: two bytes each, enough for 32767 experts."""
MAX_EXPERTS = int(np.iinfo(ROUTE_DTYPE).max)
TRACE_FILE_KIND = reads.FileKind(
    "routing trace",
    GIB,
    InputError,
    "it is not a klotski routing trace: record one with run --record-routing",
)
"""A trace holds 2 bytes per token, layer and top-k choice, compressed: 1 GiB is ~10^9 routes."""
MAX_ARRAY_BYTES = 8 * GIB
"""The largest array a trace's header may declare: checked before the array is allocated."""


@dataclass(frozen=True)
class TraceMeta:
    """The shape of the model a trace was recorded from."""

    model_type: str
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    expert_bytes: int  # bytes of one routed expert (gate, up and down matrices)
    format_version: int = FORMAT_VERSION

    @classmethod
    def of(cls, spec: ModelSpec) -> TraceMeta:
        return cls(
            model_type=spec.family,
            num_layers=spec.num_layers,
            num_experts=spec.num_experts,
            top_k=spec.top_k,
            hidden_size=spec.hidden_size,
            expert_bytes=spec.expert_bytes,
        )

    def describe(self) -> str:
        """``"mixtral, 4 layers x 8 experts, top-2"``."""
        return f"{self.model_type}, {self.num_layers} layers x {self.num_experts} experts, top-{self.top_k}"

    def matches(self, other: TraceMeta) -> bool:
        """Same model shape (``expert_bytes`` aside: the same model in another dtype routes alike)."""
        keys = ("model_type", "num_layers", "num_experts", "top_k", "hidden_size")
        return all(getattr(self, key) == getattr(other, key) for key in keys)


class RoutingRecorder:
    """Collects the routes of a run, step by step; layers arrive 0..L-1 in order within a step."""

    def __init__(self, meta: TraceMeta) -> None:
        assert 0 < meta.num_experts <= MAX_EXPERTS, f"{meta.num_experts} experts do not fit in int16 ids"
        self.meta = meta
        self._steps: list[np.ndarray] = []  # finished steps, each [L, T, k]
        self._layers: list[np.ndarray] | None = None  # the open step, one [T, k] per layer so far

    def begin_step(self) -> None:
        """Open a new forward step; the previous one must have recorded every layer."""
        self._close_step()
        self._layers = []

    def record(self, layer: int, routes: Sequence[Sequence[int]] | npt.NDArray[np.int64]) -> None:
        """Per token of all n batches, the experts selected in ``layer`` of the open step."""
        assert self._layers is not None, "record() before begin_step()"
        assert layer == len(self._layers), f"layer {layer} recorded after {len(self._layers)} layers"
        tokens = len(routes)
        array = np.asarray(routes, dtype=np.int64).reshape(tokens, -1) if tokens else self._no_tokens()
        assert array.shape[1] == self.meta.top_k, f"{array.shape[1]} experts per token, not top-k"
        assert not self._layers or tokens == len(self._layers[0]), "token count changed within a step"
        assert array.size == 0 or 0 <= array.min() <= array.max() < self.meta.num_experts, "expert id"
        self._layers.append(array.astype(ROUTE_DTYPE))

    def trace(self) -> RoutingTrace:
        """Every complete step so far (a step cut short, e.g. by an error, is left out)."""
        if self._layers is not None and len(self._layers) < self.meta.num_layers:
            logger.debug("routing trace: leaving out an unfinished step (%d layers)", len(self._layers))
            return RoutingTrace(self.meta, tuple(self._steps))
        self._close_step()
        return RoutingTrace(self.meta, tuple(self._steps))

    def _no_tokens(self) -> np.ndarray:
        return np.empty((0, self.meta.top_k), dtype=np.int64)  # [0, k]

    def _close_step(self) -> None:
        if self._layers:
            assert len(self._layers) == self.meta.num_layers, (
                f"step closed after {len(self._layers)} of {self.meta.num_layers} layers"
            )
            self._steps.append(np.stack(self._layers))  # [L, T, k]
        self._layers = None


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    """The routes of a recorded run: ``steps[s]`` is int16 ``[L, T_s, k]``."""

    meta: TraceMeta
    steps: tuple[np.ndarray, ...]
    source: Path | None = field(default=None, compare=False)  # the file it was loaded from

    @property
    def num_tokens(self) -> int:
        return sum(step.shape[1] for step in self.steps)

    def routes(self, step: int, layer: int) -> list[list[int]]:
        """Per token of ``step``, the experts it selected in ``layer``."""
        routes: list[list[int]] = self.steps[step][layer].tolist()
        return routes

    def as_steps(self) -> list[list[list[list[int]]]]:
        """``as_steps()[s][layer]`` are the routes of that step and layer (for ``warm_up``)."""
        return [step.tolist() for step in self.steps]

    def check_model(self, spec: ModelSpec) -> None:
        """Refuse a trace recorded from a model of another shape than ``spec``."""
        model = TraceMeta.of(spec)
        if not self.meta.matches(model):
            name = self.source if self.source is not None else "(not from a file)"
            raise ConfigError(
                f"routing trace {name} was recorded from another model ({self.meta.describe()}, "
                f"hidden {self.meta.hidden_size}); this model is {model.describe()}, "
                f"hidden {model.hidden_size}; record a new one"
            )

    def save(self, path: Path) -> None:
        """Write the trace to ``path`` atomically: the old file or the whole new one, never half."""
        arrays = _to_arrays(self)
        with atomic_open(path, "wb", what="routing trace") as handle:
            np.savez_compressed(handle, **arrays)
        logger.info(
            "routing trace: %d steps, %d tokens written to %s", len(self.steps), self.num_tokens, path
        )

    @classmethod
    def load(cls, path: Path) -> RoutingTrace:
        """Read a trace written by :meth:`save`; anything else is a one-line :class:`InputError`."""
        contents = reads.read_npz(path, TRACE_FILE_KIND, max_array_bytes=MAX_ARRAY_BYTES)
        meta = _meta_from(contents, path)
        return cls(meta, _steps_from(contents, meta, path), source=path)


def _to_arrays(trace: RoutingTrace) -> dict[str, Any]:
    meta = trace.meta
    counts = [step.shape[1] for step in trace.steps]
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)  # [S + 1]
    empty = np.empty((meta.num_layers, 0, meta.top_k), dtype=ROUTE_DTYPE)  # [L, 0, k]
    routes = np.concatenate(trace.steps, axis=1) if trace.steps else empty  # [L, T_total, k]
    text = json.dumps({"format": FORMAT_TAG, **asdict(meta)})
    return {"meta": np.array(text), "routes": routes.astype(ROUTE_DTYPE), "offsets": offsets}


def _meta_from(contents: dict[str, np.ndarray], path: Path) -> TraceMeta:
    """The checked meta of a loaded archive."""
    not_trace = f"{path} is not a klotski routing trace"
    if "meta" not in contents or contents["meta"].dtype.kind != "U" or contents["meta"].ndim != 0:
        raise InputError(f"{not_trace} (no readable meta); record one with run --record-routing")
    raw: Any = reads.parse_json(str(contents["meta"]), path, TRACE_FILE_KIND)
    if not isinstance(raw, dict) or raw.pop("format", None) != FORMAT_TAG:
        raise InputError(f"{not_trace} (no {FORMAT_TAG!r} tag); record one with run --record-routing")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(
            f"routing trace {path} has format version {version}; this klotski-tier reads version "
            f"{FORMAT_VERSION}: record it again with this version"
        )
    names = {f.name for f in fields(TraceMeta)}
    if set(raw) != names or not _meta_values_ok(raw):
        raise InputError(f"routing trace {path} has a malformed meta {raw}; record it again")
    return TraceMeta(**raw)


def _meta_values_ok(raw: dict[str, Any]) -> bool:
    counts = [raw[key] for key in ("num_layers", "num_experts", "top_k", "hidden_size", "expert_bytes")]
    positive = all(isinstance(value, int) and value > 0 for value in counts)
    return positive and isinstance(raw["model_type"], str) and raw["num_experts"] <= MAX_EXPERTS


def _steps_from(contents: dict[str, np.ndarray], meta: TraceMeta, path: Path) -> tuple[np.ndarray, ...]:
    """Split the concatenated routes at the step offsets, checking every array against the meta."""
    routes, offsets = contents.get("routes"), contents.get("offsets")
    problem = _array_problem(routes, offsets, meta)
    if problem:
        raise InputError(f"routing trace {path} is inconsistent: {problem}; record it again")
    assert routes is not None and offsets is not None
    routes = routes.astype(ROUTE_DTYPE)  # [L, T_total, k]
    return tuple(routes[:, start:end] for start, end in pairwise(offsets.tolist()))


def _array_problem(routes: np.ndarray | None, offsets: np.ndarray | None, meta: TraceMeta) -> str | None:
    """What is wrong with the routes and offsets arrays, or None."""
    if routes is None or offsets is None:
        return "the routes or offsets array is missing"
    shape = (meta.num_layers, meta.top_k)
    if routes.ndim != 3 or (routes.shape[0], routes.shape[2]) != shape or routes.dtype.kind not in "iu":
        return f"routes are {routes.dtype} {list(routes.shape)}, not int [{shape[0]}, tokens, {shape[1]}]"
    if offsets.ndim != 1 or offsets.dtype.kind not in "iu" or len(offsets) == 0:
        return f"offsets are {offsets.dtype} {list(offsets.shape)}, not a list of int step starts"
    if offsets[0] != 0 or offsets[-1] != routes.shape[1] or bool(np.any(np.diff(offsets) < 0)):
        return f"step offsets do not split {routes.shape[1]} tokens in order"
    if routes.size and not 0 <= int(routes.min()) <= int(routes.max()) < meta.num_experts:
        return f"expert ids outside 0..{meta.num_experts - 1}"
    return None
