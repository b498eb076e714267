"""How many experts a layer activates for T tokens, how many tokens each gets, how many were predicted.

Routes come from a :class:`RouteSampler`, which draws the routes of T tokens through every layer as
an int array ``[L, T, k]`` (expert ids, a token's first choice in column 0):

- :class:`TraceRouting`: tokens resampled (with replacement) from a recorded routing trace;
- :class:`TableRouting`: a Markov chain over a correlation policy's learned tables: a token's first
  choice in layer 0 from the layer's selection frequencies, in layer l from the co-activation row
  of its first choice in l-1, its other k-1 choices from the layer's frequencies;
- :class:`ParametricRouting`, for models without either: Zipf-like skew within a layer (the r-th
  hottest expert of a layer, in a random order per layer, has weight ``1 / (r + 1) ** skew``; a
  token draws k distinct experts in proportion to the weights) and inter-layer correlation (with
  probability ``correlation`` a token's first choice in layer l is a fixed function of its first
  choice in l-1: a random permutation per layer, so it is predictable but not the same expert;
  each of its k choices is linked so, independently).
  ``DEMO_SKEW``/``DEMO_CORRELATION`` reproduce the demo model's measured routing.

The engine's hot experts are those its prefetch policy predicts. :class:`HotPredictor` is the
correlation policy (``policies/correlation.py``, no smoothing, no decay) in numpy: every token's
normalized co-activation rows of its layer l-1 experts, summed, ranked; the layer's frequencies for
layer 0, for experts never seen, and to fill the ranking.

:class:`RoutingModel` draws a pool of tokens once; for T tokens it picks T of them a few times, ranks
each layer's experts as the predictor (warmed up on a separate draw) would, and keeps the tokens of
the expert at each rank: ``ranked_tokens[l]`` is ``[draws, E]``. The K hot experts are ranks ``< K``;
the cold ones that are used (``tokens > 0``) are Q; the planner's figures follow (:class:`LayerLoads`).
"""

from __future__ import annotations

import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from klotski_tier.core.errors import ConfigError
from klotski_tier.core.model.spec import ModelSpec
from klotski_tier.core.observe.routing_trace import RoutingTrace

logger = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

DEMO_SKEW = 1.6
"""Zipf exponent of :class:`ParametricRouting` fitted (grid, least squares over top2_share, predictability,
baseline and recall of :mod:`klotski_tier.core.observe.routing_stats`) to a routing trace of the demo (8 demo
prompts, 32 new tokens, 2,800 tokens): trace 0.51 / 0.67 / 0.28 / 0.64, model 0.49 / 0.71 / 0.31 / 0.62.
The links spread selections, so the exponent is above the demo's own (1.0)."""
DEMO_CORRELATION = 0.7
"""Probability that a token's choice in layer l follows from its choice in l-1, fitted with DEMO_SKEW."""
DEFAULT_DRAWS = 12  # route draws averaged per token count ...
DRAW_TOKENS = 256  # ... up to this many tokens; larger counts average over more tokens per draw, so fewer
MIN_DRAWS = 2
MAX_SAMPLED_TOKENS = 2048  # larger token counts are drawn at this size and their counts scaled up
POOL_TOKENS = 2 * MAX_SAMPLED_TOKENS  # tokens drawn once; each estimate picks its tokens among them
WARMUP_TOKENS = 1024  # tokens the predictor learns from before the draws
FORCED_SCORE = 1e9  # a linked choice outranks every drawn one
TIE_DECIMALS = 12  # scores equal to 12 decimals are ties, broken to the lower id (as policies/tables.py)


class RouteSampler(ABC):
    """Draws the routes of ``tokens`` tokens through every layer: int ``[L, T, k]``."""

    num_layers: int
    num_experts: int
    top_k: int

    @abstractmethod
    def sample(self, tokens: int, rng: np.random.Generator) -> IntArray: ...

    def describe(self) -> str:
        return type(self).__name__


def _top_k_by_score(scores: FloatArray, k: int) -> IntArray:
    """Per row of ``scores`` [T, E], the k highest columns, highest first: [T, k]."""
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # [T, k] unordered
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")  # [T, k]
    return np.take_along_axis(top, order, axis=1).astype(np.int64)


def _gumbel_scores(rng: np.random.Generator, log_weights: FloatArray, tokens: int) -> FloatArray:
    """Scores whose top-k is k experts drawn without replacement in proportion to exp(log_weights)."""
    return log_weights[None, :] + rng.gumbel(size=(tokens, len(log_weights)))  # [T, E]


class ParametricRouting(RouteSampler):
    """Zipf-like skew per layer and a predictable link between layers (see the module docstring)."""

    def __init__(
        self, num_layers: int, num_experts: int, top_k: int, *, skew: float, correlation: float, seed: int = 0
    ) -> None:
        if not (skew >= 0 and 0 <= correlation <= 1 and 1 <= top_k <= num_experts):
            raise ConfigError(
                f"routing model: need skew >= 0, correlation in [0, 1] and 1 <= top_k <= experts, got "
                f"skew={skew}, correlation={correlation}, top_k={top_k}, experts={num_experts}"
            )
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.skew, self.correlation = skew, correlation
        rng = np.random.default_rng(seed)
        ranks = np.arange(num_experts, dtype=np.float64)
        self._log_weights = [  # [E] per layer: expert e's log weight from its rank in the layer's hot order
            -skew * np.log1p(ranks)[np.argsort(rng.permutation(num_experts))] for _ in range(num_layers)
        ]
        self._links = [rng.permutation(num_experts) for _ in range(num_layers)]  # first choice l-1 -> l

    @classmethod
    def for_spec(cls, spec: ModelSpec, *, skew: float = DEMO_SKEW, correlation: float = DEMO_CORRELATION,
                 seed: int = 0) -> ParametricRouting:  # fmt: skip
        return cls(
            spec.num_layers, spec.num_experts, spec.top_k, skew=skew, correlation=correlation, seed=seed
        )

    def sample(self, tokens: int, rng: np.random.Generator) -> IntArray:
        routes = np.empty((self.num_layers, tokens, self.top_k), dtype=np.int64)
        for layer in range(self.num_layers):
            scores = _gumbel_scores(rng, self._log_weights[layer], tokens)  # [T, E]
            if layer > 0:
                linked = rng.random((tokens, self.top_k)) < self.correlation  # [T, k]
                forced = self._links[layer][routes[layer - 1]]  # [T, k]
                rows = np.broadcast_to(np.arange(tokens)[:, None], forced.shape)
                first_ranks = FORCED_SCORE - np.arange(self.top_k, dtype=np.float64)  # keep the order
                scores[rows[linked], forced[linked]] = np.broadcast_to(first_ranks, forced.shape)[linked]
            routes[layer] = _top_k_by_score(scores, self.top_k)
        return routes

    def describe(self) -> str:
        return f"parametric (skew {self.skew:g}, correlation {self.correlation:g})"


class TraceRouting(RouteSampler):
    """Tokens resampled from a recorded trace (each keeps its routes through every layer)."""

    def __init__(self, trace: RoutingTrace) -> None:
        if trace.num_tokens == 0:
            raise ConfigError("the routing trace holds no tokens; record one with run --record-routing")
        self.trace = trace
        self.num_layers, self.num_experts, self.top_k = (
            trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k,
        )  # fmt: skip
        self._routes = np.concatenate(trace.steps, axis=1).astype(np.int64)  # [L, T_total, k]

    def sample(self, tokens: int, rng: np.random.Generator) -> IntArray:
        picks = rng.integers(0, self._routes.shape[1], size=tokens)  # [T]
        return self._routes[:, picks]

    def describe(self) -> str:
        return f"trace {self.trace.source or ''} ({self.trace.num_tokens} tokens)".replace("  ", " ")


class TableRouting(RouteSampler):
    """A Markov chain over a correlation policy's state (``frequency_*`` and optional ``pair_*`` columns)."""

    def __init__(
        self, state: Mapping[str, Sequence[Any]], num_layers: int, num_experts: int, top_k: int
    ) -> None:
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self._frequency = np.full((num_layers, num_experts), 1e-9)  # [L, E], never all zero
        self._pairs = np.zeros((num_layers, num_experts, num_experts))  # [L, E_prev, E]
        try:
            frequency = [state[f"frequency_{c}"] for c in ("layer", "expert", "count")]
            for layer, expert, count in zip(*frequency, strict=True):
                self._frequency[int(layer), int(expert)] += float(count)
            columns = [state.get(f"pair_{c}", ()) for c in ("layer", "previous", "expert", "count")]
            for layer, previous, expert, count in zip(*columns, strict=True):
                self._pairs[int(layer), int(previous), int(expert)] += float(count)
        except (KeyError, ValueError, IndexError, TypeError) as exc:
            raise ConfigError(
                f"the routing table is not a correlation policy state of this model ({exc}); save one with "
                "prefetch.save_state"
            ) from exc

    def sample(self, tokens: int, rng: np.random.Generator) -> IntArray:
        routes = np.empty((self.num_layers, tokens, self.top_k), dtype=np.int64)
        for layer in range(self.num_layers):
            scores = _gumbel_scores(rng, np.log(self._frequency[layer]), tokens)  # [T, E]
            if layer > 0:
                rows = self._pairs[layer][routes[layer - 1, :, 0]]  # [T, E]
                known = rows.sum(axis=1) > 0  # [T]
                cumulative = np.cumsum(rows[known], axis=1)  # [T', E]
                draw = rng.random(int(known.sum()))[:, None] * cumulative[:, -1:]
                first = (cumulative < draw).sum(axis=1)  # [T'] inverse-CDF draw of the first choice
                scores[np.flatnonzero(known), first] = np.inf
            routes[layer] = _top_k_by_score(scores, self.top_k)
        return routes

    def describe(self) -> str:
        return "correlation table"


class HotPredictor:
    """The correlation prefetch policy in numpy: ranks a layer's experts from the previous layer's routes."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self._pairs = np.zeros((num_layers, num_experts, num_experts))  # [L, E_prev, E]
        self._frequency = np.zeros((num_layers, num_experts))  # [L, E]
        self._normalized: dict[int, tuple[FloatArray, FloatArray]] = {}  # layer -> tables, until it changes

    def observe(self, routes: IntArray) -> None:
        """Learn from the routes ``[L, T, k]`` of one draw (every layer, every pair of layers)."""
        for layer in range(routes.shape[0]):
            self.observe_layer(layer, routes[layer], routes[layer - 1] if layer > 0 else None)

    def observe_layer(self, layer: int, routes: IntArray, previous: IntArray | None) -> None:
        """Learn from one layer's routes ``[T, k]`` and the same tokens' routes in the layer before."""
        experts = self._frequency.shape[1]
        self._normalized.pop(layer, None)
        self._frequency[layer] += np.bincount(routes.ravel(), minlength=experts)
        if previous is not None and len(previous) == len(routes):
            pairs = (
                previous[:, :, None] * experts + routes[:, None, :]
            )  # [T, k, k]: (e_prev, e) of each token
            self._pairs[layer] += np.bincount(pairs.ravel(), minlength=experts * experts).reshape(
                experts, experts
            )

    def predict(self, layer: int, k: int, previous: IntArray | None) -> list[int]:
        """The k experts the correlation policy would prefetch (fewer while it has seen nothing)."""
        known = self._frequency[layer] > 0
        if previous is not None and layer > 0 and previous.size:
            known |= self._pairs[layer][np.unique(previous)].sum(axis=0) > 0
        return [int(e) for e in self.ranking(layer, previous) if known[e]][:k]

    def ranking(self, layer: int, previous: IntArray | None) -> IntArray:
        """Every expert of ``layer``, most likely hot first, given the tokens' routes ``[T, k]`` in l-1."""
        experts = self._frequency.shape[1]
        uses = np.zeros((1, experts))
        if previous is not None and layer > 0:
            uses[0] = np.bincount(previous.ravel(), minlength=experts)
        order: IntArray = self._order([layer], uses)[0]
        return order

    def rankings(self, uses: FloatArray) -> IntArray:
        """:meth:`ranking` of every layer at once: ``uses[l]`` [L, E] counts the tokens' selections of
        each expert in layer l - 1 (row 0 is ignored: layer 0 goes by frequency)."""
        uses = uses.copy()
        uses[0] = 0.0
        return self._order(list(range(len(uses))), uses)

    def _order(self, layers: list[int], uses: FloatArray) -> IntArray:
        """Experts by summed tendency, then (unscored) by frequency, then id: [layers, E]."""
        tables = [self._tables(layer) for layer in layers]
        prior = np.stack([p for p, _ in tables])  # [l, E]
        tendency = np.stack([t for _, t in tables])  # [l, E_prev, E]
        scores = np.round(np.einsum("le,lef->lf", uses, tendency), TIE_DECIMALS)  # [l, E]
        unscored = np.where(scores > 0, 0.0, -np.round(prior, TIE_DECIMALS))  # the prior fills the rest
        first = np.argsort(unscored, axis=1, kind="stable")  # stable: ties stay in id order
        second = np.argsort(np.take_along_axis(-scores, first, axis=1), axis=1, kind="stable")
        return np.take_along_axis(first, second, axis=1).astype(np.int64)

    def _tables(self, layer: int) -> tuple[FloatArray, FloatArray]:
        """Normalized frequencies [E] and tendencies [E_prev, E] of ``layer`` (the prior for unseen rows)."""
        if layer not in self._normalized:
            frequency, pairs = self._frequency[layer], self._pairs[layer]
            prior = frequency / max(float(frequency.sum()), 1e-300)  # [E]
            totals = pairs.sum(axis=1, keepdims=True)  # [E_prev, 1]
            tendency = np.where(totals > 0, pairs / np.maximum(totals, 1e-300), prior[None, :])  # [E_prev, E]
            self._normalized[layer] = (prior, tendency)
        return self._normalized[layer]


@dataclass(frozen=True)
class LayerLoads:
    """One layer's expert work for T tokens: tokens of the expert at each predicted rank, per draw."""

    ranked_tokens: FloatArray  # [draws, E]: tokens routed to the expert the predictor ranks r-th
    usage: FloatArray  # [E]: probability that expert e (by id) gets tokens in a step

    def used(self, ranks: slice) -> float:
        """Expected number of experts among ``ranks`` that get tokens."""
        return float((self.ranked_tokens[:, ranks] > 0).sum(axis=1).mean())

    def compute_s(self, ranks: slice, expert_s: Callable[[FloatArray], FloatArray]) -> float:
        """Expected compute of the experts among ``ranks`` (``expert_s`` is 0 for 0 tokens)."""
        return float(expert_s(self.ranked_tokens[:, ranks]).sum(axis=1).mean())

    def distinct_max(self) -> int:
        return int((self.ranked_tokens > 0).sum(axis=1).max())

    def hot_share(self, hot: int) -> float:
        """Share of the layer's selections that land on its ``hot`` predicted experts."""
        return float(self.ranked_tokens[:, :hot].sum() / max(self.ranked_tokens.sum(), 1e-300))


class RoutingModel:
    """Expected routing figures per token count, from a sampler and a warmed-up predictor (cached)."""

    def __init__(self, sampler: RouteSampler, *, draws: int = DEFAULT_DRAWS, seed: int = 0) -> None:
        if draws < 1:
            raise ConfigError(f"routing model: draws must be at least 1, got {draws}")
        self.sampler, self.draws, self.seed = sampler, draws, seed
        self.predictor = HotPredictor(sampler.num_layers, sampler.num_experts)
        self.predictor.observe(sampler.sample(WARMUP_TOKENS, np.random.default_rng(seed)))
        self._pool = sampler.sample(POOL_TOKENS, np.random.default_rng((seed, 1)))  # [L, M, k]
        layers, experts = sampler.num_layers, sampler.num_experts
        flat = self._pool.reshape(layers, -1) + np.arange(layers)[:, None] * experts  # [L, M * k]
        counts = np.bincount(flat.ravel(), minlength=layers * experts).reshape(layers, experts)
        self._selection = counts / POOL_TOKENS  # [L, E]: probability that a token selects e

    @classmethod
    def default_for(cls, spec: ModelSpec, seed: int = 0) -> RoutingModel:
        """The parametric model with the demo's skew and correlation (no trace, no table)."""
        return cls(ParametricRouting.for_spec(spec, seed=seed), seed=seed)

    def check_model(self, spec: ModelSpec) -> None:
        sampler = self.sampler
        shape = (sampler.num_layers, sampler.num_experts, sampler.top_k)
        if shape != (spec.num_layers, spec.num_experts, spec.top_k):
            raise ConfigError(
                f"the routing model describes {sampler.num_layers} layers x {sampler.num_experts} experts, "
                f"top-{sampler.top_k}; the model has {spec.num_layers} x {spec.num_experts}, top-{spec.top_k}"
            )

    @functools.lru_cache(maxsize=256)  # noqa: B019 (one model per plan; the cache dies with it)
    def loads(self, tokens: int) -> tuple[LayerLoads, ...]:
        """Per layer, the ranked token counts of ``tokens`` tokens routed together (one batch group)."""
        drawn = min(tokens, MAX_SAMPLED_TOKENS)
        scale = tokens / drawn if drawn else 0.0
        draws = max(MIN_DRAWS, min(self.draws, round(self.draws * DRAW_TOKENS / max(drawn, 1))))
        rng = np.random.default_rng((self.seed, tokens))
        layers, experts = self.sampler.num_layers, self.sampler.num_experts
        offsets = np.arange(layers)[:, None] * experts  # [L, 1]: one bincount for every layer
        ranked = np.zeros((layers, draws, experts))  # [L, draws, E]
        for draw in range(draws):
            picks = rng.choice(self._pool.shape[1], size=drawn, replace=False)  # [T] distinct tokens
            flat = self._pool[:, picks].reshape(layers, -1) + offsets  # [L, T * k]
            counts = np.bincount(flat.ravel(), minlength=layers * experts).reshape(layers, experts)  # [L, E]
            order = self.predictor.rankings(np.vstack([np.zeros((1, experts)), counts[:-1]]))  # [L, E]
            ranked[:, draw] = np.take_along_axis(counts * scale, order, axis=1)
        usage = 1.0 - (1.0 - self._selection) ** tokens  # [L, E]: independent tokens
        return tuple(LayerLoads(ranked[layer], usage[layer]) for layer in range(layers))

    def distinct(self, tokens: int) -> float:
        """Expected experts a layer activates for ``tokens`` tokens, averaged over layers."""
        return float(np.mean([load.used(slice(None)) for load in self.loads(tokens)]))

    def hot_share(self, tokens: int, hot: int) -> float:
        """Expected share of selections taken by the ``hot`` predicted experts, averaged over layers."""
        return float(np.mean([load.hot_share(hot) for load in self.loads(tokens)]))
