"""The token check of a system with its own bf16 kernels: the project's rule for reduced precision.

The engine's systems must generate the reference's tokens exactly
(:func:`benchmarks.e2e.results.check_tokens`). llama.cpp computes the same bf16 model with its own
kernels, which accumulate in another order and round differently from torch's, and so does
transformers (accelerate) against the engine on a CPU without native bfloat16, where the engine
widens its products to float32 (``ops.linear``): two greedy decoders may part where the best two
logits are within rounding of each other. Such systems are
held to rule 2 of ``tests/numerics.py`` (free-running tokens), the rule the test suite applies to
the engine against transformers:

- a sequence's tokens equal the reference's, except at a near-tie: where they first part, the
  system's token and the reference run's must both score, in the reference model's logits ``row``
  at that position (the prompt and the reference run's tokens before it, through transformers),
  within ``ROUNDINGS x eps(bf16) x max|row|`` of the best logit there; the rest of that sequence is
  then not compared, as two greedy decoders that part at a tie continue from different texts;
- a parting beyond that tolerance is a real divergence: :class:`TokenMismatch`, as for any system.

:func:`partings` finds where each sequence first parts, :func:`judge` applies the rule given the
reference's logits, and :func:`run_reference_logits` (a worker job, ``kind`` ``reference-logits``)
computes those logits with transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks.e2e.results import TokenMismatch
from benchmarks.e2e.worker import Job

ROUNDINGS = 8
"""The tolerance in units of ``eps x max|logit|``: ``tests/numerics.py``'s ``ROUNDINGS`` (a test checks)."""
BF16_EPS = 2.0**-7
"""The spacing of bfloat16 at 1 (``torch.finfo(torch.bfloat16).eps``)."""


@dataclass(frozen=True)
class Parting:
    """Where a system's sequence first differs from the reference's (None: no token there)."""

    prompt: int
    position: int
    token: int | None  # the system's
    expected: int | None  # the reference's


@dataclass
class TokenCheck:
    """How a system's sequences compare with the reference's, over all its runs."""

    sequences: int = 0
    exact: int = 0
    near_ties: list[dict[str, Any]] = field(default_factory=list)  # each parting, its margin and tolerance

    @property
    def near_tie(self) -> int:
        return len(self.near_ties)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": f"at the first parting, within {ROUNDINGS} x eps(bf16) x max|logit| of the best",
            "sequences": self.sequences,
            "exact": self.exact,
            "near_tie": self.near_tie,
            "near_ties": self.near_ties,
        }


def tolerance(row: Sequence[float]) -> float:
    """How far below the best logit of ``row`` a token may score and still be a near-tie."""
    return ROUNDINGS * BF16_EPS * max(abs(v) for v in row)


def partings(system: str, reference: str, expected: list[list[int]], got: list[list[int]]) -> list[Parting]:
    """Where each of ``got``'s sequences first parts from ``expected``'s (sequences that do not: none)."""
    if len(got) != len(expected):
        raise TokenMismatch(
            f"{system} returned {len(got)} outputs for {len(expected)} prompts ({reference}: "
            f"{len(expected)}); the systems disagree"
        )
    found = []
    for prompt, (mine, theirs) in enumerate(zip(got, expected, strict=True)):
        for position in range(max(len(mine), len(theirs))):
            token = mine[position] if position < len(mine) else None
            want = theirs[position] if position < len(theirs) else None
            if token != want:
                found.append(Parting(prompt, position, token, want))
                break
    return found


def prefix(prompts: list[list[int]], expected: list[list[int]], parting: Parting) -> list[int]:
    """The tokens before ``parting``: its prompt and the reference's tokens up to it."""
    return list(prompts[parting.prompt]) + list(expected[parting.prompt][: parting.position])


def judge(
    system: str,
    reference: str,
    found: list[Parting],
    rows: Sequence[Sequence[float]],
    sequences: int,
    check: TokenCheck | None = None,
) -> TokenCheck:
    """``check`` (a new one if None) with one run's ``sequences`` counted; ``found`` its partings and
    ``rows`` the reference model's logits [V] at each. TokenMismatch at a real divergence."""
    check = check if check is not None else TokenCheck()
    for parting, row in zip(found, rows, strict=True):
        where = f"{system} generated {_token(parting.token)} at prompt {parting.prompt}, "
        where += f"position {parting.position}"
        theirs = f"where {reference} generated {_token(parting.expected)}"
        if parting.token is None or parting.expected is None or not 0 <= parting.token < len(row):
            raise TokenMismatch(f"{where}, {theirs}; the systems disagree, so the comparison is void")
        allowed = tolerance(row)
        shortfall = max(row) - row[parting.token]
        if shortfall > allowed:
            raise TokenMismatch(
                f"{where}, {theirs}: the reference model scores it {shortfall:.3g} below its best, more than "
                f"the bf16 tolerance {allowed:.3g}, a real divergence, not a near-tie; the comparison is void"
            )
        behind = max(row) - row[parting.expected] if 0 <= parting.expected < len(row) else float("inf")
        if behind > allowed:  # both sides of a near-tie must be near the best: the reference run's token too
            raise TokenMismatch(
                f"{where}, {theirs}: the reference model scores {reference}'s token {behind:.3g} below its "
                f"best, more than the bf16 tolerance {allowed:.3g}, a real divergence; the comparison is void"
            )
        check.near_ties.append(
            {**asdict(parting), "shortfall": shortfall, "reference_shortfall": behind, "tolerance": allowed}
        )
    check.sequences += sequences
    check.exact += sequences - len(found)
    return check


def _token(token: int | None) -> str:
    return "nothing" if token is None else f"token {token}"


def run_reference_logits(job: Job) -> dict[str, Any]:
    """The reference model's logits [V] after each of ``job.prompts`` (transformers, bf16, eager)."""
    import torch
    from transformers import AutoModelForCausalLM

    auto: Any = AutoModelForCausalLM  # from_pretrained's model is untyped
    model = auto.from_pretrained(job.model, dtype=torch.bfloat16, attn_implementation="eager")
    model.eval()
    rows = []
    with torch.inference_mode():
        for ids in job.prompts:  # one at a time: prefixes differ in length, and padding rounds differently
            logits = model(torch.tensor([ids])).logits  # [1, T, V]
            rows.append(logits[0, -1].float().tolist())
    return {"logits": rows}
