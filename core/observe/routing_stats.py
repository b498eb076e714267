"""How a model routes: skew within each layer and predictability between consecutive layers.

Input: for each layer l, the routes of the same T tokens, an int array ``[T, k]`` of expert ids,
column 0 the token's first choice (its highest router weight), as the gate returns them. A
*selection* is one (token, expert) entry: a layer has T * k of them. Definitions:

- ``shares[l]``: share of layer l's selections taken by each expert, sorted from the busiest down
  (sums to 1; uniform routing gives 1/E each).
- ``top2_share[l]``: the sum of the two largest shares (uniform routing: 2/E; Mixtral-8x7B: ~0.5).

For each pair of consecutive layers (l-1, l), reported at index l-1 (so L-1 values):

- ``predictability``: accuracy of the best predictor of a token's first choice in layer l from
  its first choice in layer l-1 alone. With N[a, b] the number of tokens whose first choices are
  a in l-1 and b in l: ``sum_a max_b N[a, b] / T``. It is measured on the same tokens it is
  fitted on (at most E * E numbers are fitted, small next to T).
- ``baseline``: accuracy of predicting the layer's most common first choice for every token,
  ``max_b sum_a N[a, b] / T``: what knowing only frequencies gives. ``predictability`` is never
  below it; independent layers give about the same number.
- ``nmi``: normalized mutual information of the two first choices,
  ``I(X; Y) / sqrt(H(X) * H(Y))``: 0 for independent layers, 1 when each determines the other
  (0 when either has one value only).
- ``recall``: what a co-activation prefetcher gets. With C[a, b] the number of tokens that
  select a in l-1 and b in l (any of their k selections), each token's predicted set is the k
  experts b with the largest ``sum over its layer-(l-1) selections a of C[a, b]`` (ties to the
  lower id); recall is the share of its layer-l selections inside that set, averaged over tokens.
- ``recall_baseline``: the same with the layer's k most selected experts as every token's
  prediction, which equals the sum of the layer's k largest shares.

Pure numpy: usable on traces without torch.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from klotski_tier.core.errors import InputError

IntArray = npt.NDArray[np.int64]
TOP_SHARE_EXPERTS = 2  # top2_share sums the shares of this many busiest experts


@dataclass(frozen=True)
class RoutingStats:
    """Routing statistics of one set of tokens through all layers (definitions: module docstring)."""

    num_tokens: int  # T
    num_experts: int  # E
    top_k: int  # k
    shares: tuple[tuple[float, ...], ...]  # [L][E] sorted, busiest first
    top2_share: tuple[float, ...]  # [L]
    predictability: tuple[float, ...]  # [L-1]: layer pair (l-1, l) at index l-1
    baseline: tuple[float, ...]  # [L-1]
    nmi: tuple[float, ...]  # [L-1]
    recall: tuple[float, ...]  # [L-1]
    recall_baseline: tuple[float, ...]  # [L-1]

    @property
    def num_layers(self) -> int:
        return len(self.shares)

    def means(self) -> dict[str, float]:
        """Each per-layer or per-pair statistic averaged over layers (NaN where there is none)."""
        names = ("top2_share", "predictability", "baseline", "nmi", "recall", "recall_baseline")
        return {name: _mean(getattr(self, name)) for name in names}

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain lists and numbers (JSON-ready), plus ``mean``: :meth:`means`."""
        fields = asdict(self)
        plain = {name: _plain(value) for name, value in fields.items()}
        return {**plain, "num_layers": self.num_layers, "mean": self.means()}


def routing_stats(routes_per_layer: Sequence[npt.ArrayLike], num_experts: int) -> RoutingStats:
    """Statistics of ``routes_per_layer`` (one ``[T, k]`` array of expert ids per layer)."""
    routes = _checked(routes_per_layer, num_experts)
    tokens, top_k = routes[0].shape
    pairs = list(itertools.pairwise(routes))
    firsts = [_joint_counts(prev[:, 0], nxt[:, 0], num_experts) for prev, nxt in pairs]
    shares = [_shares(layer, num_experts) for layer in routes]
    return RoutingStats(
        num_tokens=tokens,
        num_experts=num_experts,
        top_k=top_k,
        shares=tuple(tuple(float(s) for s in np.sort(share)[::-1]) for share in shares),
        top2_share=tuple(float(np.sort(share)[::-1][:TOP_SHARE_EXPERTS].sum()) for share in shares),
        predictability=tuple(float(n.max(axis=1).sum() / tokens) for n in firsts),
        baseline=tuple(float(n.sum(axis=0).max() / tokens) for n in firsts),
        nmi=tuple(_nmi(n) for n in firsts),
        recall=tuple(_coactivation_recall(prev, nxt, num_experts) for prev, nxt in pairs),
        recall_baseline=tuple(float(np.sort(s)[::-1][:top_k].sum()) for s in shares[1:]),
    )


def _checked(routes_per_layer: Sequence[npt.ArrayLike], num_experts: int) -> list[IntArray]:
    """The routes as int64 arrays, after checking they describe the same tokens in every layer."""
    if num_experts < 1 or not routes_per_layer:
        raise InputError("routing statistics need at least one layer of routes and one expert")
    routes = [np.asarray(layer).astype(np.int64, copy=False) for layer in routes_per_layer]
    shape = routes[0].shape
    if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
        raise InputError(f"routes must be [tokens, k] arrays with tokens, k > 0, not of shape {shape}")
    if any(layer.shape != shape for layer in routes):
        shapes = sorted({layer.shape for layer in routes})
        raise InputError(f"every layer's routes must cover the same tokens and k, got shapes {shapes}")
    if any(layer.min() < 0 or layer.max() >= num_experts for layer in routes):
        raise InputError(f"expert ids must be in [0, {num_experts}): are the routes from another model?")
    if any((np.diff(np.sort(layer, axis=1), axis=1) == 0).any() for layer in routes):
        raise InputError("a token selects the same expert twice in one layer: routes must be top-k sets")
    return routes


def _shares(layer: IntArray, num_experts: int) -> npt.NDArray[np.float64]:
    """[E]: share of the layer's selections taken by each expert."""
    return np.bincount(layer.ravel(), minlength=num_experts) / layer.size


def _joint_counts(prev: IntArray, nxt: IntArray, num_experts: int) -> IntArray:
    """[E, E]: [a, b] counts the tokens with ``prev == a`` and ``nxt == b``."""
    flat = np.bincount(prev * num_experts + nxt, minlength=num_experts * num_experts)
    return flat.reshape(num_experts, num_experts)


def _nmi(joint: IntArray) -> float:
    """I(X; Y) / sqrt(H(X) H(Y)) of the joint counts ``[E, E]`` (0 when an entropy is 0)."""
    p = joint / joint.sum()  # [E, E]
    px, py = p.sum(axis=1), p.sum(axis=0)  # [E] each
    hx, hy = _entropy(px), _entropy(py)
    if hx <= 0.0 or hy <= 0.0:
        return 0.0
    nonzero = p > 0
    mutual = float((p[nonzero] * np.log(p[nonzero] / np.outer(px, py)[nonzero])).sum())
    return max(0.0, mutual / float(np.sqrt(hx * hy)))


def _entropy(p: npt.NDArray[np.float64]) -> float:
    nonzero = p[p > 0]
    return float(-(nonzero * np.log(nonzero)).sum())


def _coactivation_recall(prev: IntArray, nxt: IntArray, num_experts: int) -> float:
    """Mean share of each token's ``nxt`` selections among the k experts co-activation predicts."""
    tokens, top_k = prev.shape
    prev_hot = np.zeros((tokens, num_experts), dtype=np.int64)  # [T, E]: 1 where the token selected e
    next_hot = np.zeros((tokens, num_experts), dtype=np.int64)  # [T, E]
    np.put_along_axis(prev_hot, prev, 1, axis=1)
    np.put_along_axis(next_hot, nxt, 1, axis=1)
    table = prev_hot.T @ next_hot  # [E, E]: C[a, b]
    scores = prev_hot @ table  # [T, E]
    predicted = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]  # [T, k]
    hits = np.take_along_axis(next_hot, predicted, axis=1).sum()
    return float(hits / (tokens * top_k))


def _mean(values: tuple[float, ...]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _plain(value: Any) -> Any:
    """Tuples (nested) as lists, for JSON."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
