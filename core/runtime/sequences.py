"""Sequences being generated, and the step inputs of a batch built from them.

A batch's KV cache holds each sequence's tokens at their own positions 0..len-1 (no left
padding). Prefill right-pads the prompts of a batch to the longest; the padded tokens are
masked out of attention and never routed to experts. Each decode step feeds one token per
sequence at position ``len``; finished sequences stay in the batch with their token masked
out of the MoE, so they cost attention only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from klotski_tier.core.model.spec import ModelSpec
from klotski_tier.core.runtime.activations import RESIDUAL_SLOTS
from klotski_tier.core.runtime.config import DEVICE_ACTIVATIONS
from klotski_tier.core.runtime.kv import DEVICE_KV, KV_SLOTS, slot_bytes
from klotski_tier.core.runtime.model_jobs import Batch


@dataclass
class GenSequence:
    """One prompt and what has been generated for it so far."""

    index: int  # position in the caller's prompt list
    prompt: list[int]
    max_new_tokens: int
    generated: list[int] = field(default_factory=list)
    logits: list[Tensor] = field(default_factory=list)  # float32 [V] per generated token, when asked
    finish_reason: str | None = None  # "eos" | "length"

    @property
    def length(self) -> int:
        """Tokens in the KV cache once the last generated token has been fed back."""
        return len(self.prompt) + len(self.generated)

    def append(self, token: int, eos_token_ids: Sequence[int]) -> None:
        self.generated.append(token)
        if token in eos_token_ids:
            self.finish_reason = "eos"
        elif len(self.generated) >= self.max_new_tokens:
            self.finish_reason = "length"


def new_batch(
    seqs: Sequence[GenSequence],
    spec: ModelSpec,
    device: torch.device,
    caches: tuple[Tensor, Tensor] | None = None,
    kv_file: Path | None = None,
    device_layers: int = 0,
) -> Batch:
    """A batch for ``seqs`` with an empty KV cache and its prefill inputs: ``caches`` where the cache
    lives away from the device (runtime/kv.py: in host RAM, or the shapes of ``kv_file``'s), its first
    ``device_layers`` layers allocated on the device; else all of it allocated on the device."""
    max_positions = max(len(s.prompt) + s.max_new_tokens for s in seqs)
    cache_shape = (spec.num_layers, len(seqs), spec.num_kv_heads, max_positions, spec.head_dim)
    k_device = v_device = None
    if caches is None:
        k_cache = torch.zeros(cache_shape, dtype=spec.dtype, device=device)
        v_cache = torch.zeros(cache_shape, dtype=spec.dtype, device=device)
    else:
        k_cache, v_cache = caches
        if device_layers:
            shape = (device_layers, *cache_shape[1:])
            k_device = torch.zeros(shape, dtype=spec.dtype, device=device)
            v_device = torch.zeros(shape, dtype=spec.dtype, device=device)
    longest = max(len(s.prompt) for s in seqs)
    ids = torch.zeros((len(seqs), longest), dtype=torch.long)  # [B, T]
    for row, seq in enumerate(seqs):
        ids[row, : len(seq.prompt)] = torch.tensor(seq.prompt, dtype=torch.long)
    lengths = torch.tensor([len(s.prompt) for s in seqs], dtype=torch.long)  # [B]
    positions = torch.arange(longest, dtype=torch.long).expand(len(seqs), longest)  # [B, T]
    return Batch(
        k_cache=k_cache,
        v_cache=v_cache,
        ids=ids.to(device),
        positions=positions.to(device),
        token_mask=(positions < lengths[:, None]).to(device),
        key_lengths=lengths.to(device),
        last_index=(lengths - 1).to(device),
        kv_cached=0,
        kv_written=(0, longest),
        kv_file=kv_file,
        k_device=k_device,
        v_device=v_device,
    )


def set_decode_inputs(batch: Batch, seqs: Sequence[GenSequence]) -> None:
    """Feed each sequence's last generated token at its next position."""
    device = batch.ids.device
    ids = torch.tensor([[s.generated[-1]] for s in seqs], dtype=torch.long)  # [B, 1]
    positions = torch.tensor([[s.length - 1] for s in seqs], dtype=torch.long)  # [B, 1]
    active = torch.tensor([[s.finish_reason is None] for s in seqs])  # [B, 1]
    batch.ids = ids.to(device)
    batch.positions = positions.to(device)
    batch.token_mask = active.to(device)
    batch.key_lengths = (positions[:, 0] + 1).to(device)
    batch.last_index = torch.zeros(len(seqs), dtype=torch.long, device=device)
    written = [s.length - 1 for s in seqs]
    batch.kv_cached = max(written)
    batch.kv_written = (min(written), max(written) + 1)


def kv_cache_bytes(seqs: Sequence[GenSequence], spec: ModelSpec) -> int:
    """Bytes of the KV cache :func:`new_batch` allocates for ``seqs``."""
    max_positions = max(len(s.prompt) + s.max_new_tokens for s in seqs)
    return len(seqs) * max_positions * spec.kv_bytes_per_token()


def kv_device_bytes(
    parts: Sequence[Sequence[GenSequence]], spec: ModelSpec, kv_home: str, device_layers: int = 0
) -> int:
    """Device bytes of the KV cache of a group of batches ``parts``: all of it at home on the device;
    kept away from it, the device's two slots, each one layer of the largest batch, and the first
    ``device_layers`` layers of every batch's cache."""
    whole = sum(kv_cache_bytes(part, spec) for part in parts)
    if kv_home != DEVICE_KV:
        batch = max(len(part) for part in parts)
        positions = max(len(s.prompt) + s.max_new_tokens for part in parts for s in part)
        return KV_SLOTS * slot_bytes(batch, positions, spec) + whole * device_layers // spec.num_layers
    return whole


def activation_bytes(seqs: Sequence[GenSequence], spec: ModelSpec) -> tuple[int, int]:
    """Upper bounds of the activations of one batch of ``seqs`` in a prefill step: (what it holds from
    phase to phase, what one batch's attention and head hold at a time).

    Held: its residual stream and normed copy [B, T, H] and its tokens' expert contributions [N, k, H].
    At a time: the attention scores of one sequence [Hq, T, T] (fp32: the attention runs one sequence
    at a time, ops._attend) and the batch's logits [B, V] (fp32): batches run their attention and head
    one after the other, so a group needs room for one batch's of these.
    """
    batch, longest = len(seqs), max(len(s.prompt) for s in seqs)
    tokens = batch * longest
    held = tokens * spec.hidden_size * spec.dtype.itemsize * (2 + spec.top_k)
    scores = spec.num_heads * longest * longest * 4
    return held, scores + batch * spec.vocab_size * 4


def residual_bytes(seqs: Sequence[GenSequence], spec: ModelSpec) -> int:
    """A prefill's residual stream [B, T, H] of one batch of ``seqs`` (part of what it holds)."""
    return len(seqs) * max(len(s.prompt) for s in seqs) * spec.hidden_size * spec.dtype.itemsize


def group_activation_bytes(
    parts: Sequence[Sequence[GenSequence]], spec: ModelSpec, home: str = DEVICE_ACTIVATIONS
) -> int:
    """Device bytes of the activations of a group of batches ``parts``: what each holds, and room for
    the largest batch's attention and head. With the residual streams in host RAM between jobs
    (runtime/activations.py), a prefill holds the two slots instead of every batch's, and a decode step
    (whose residuals stay on the device) what each batch holds at one token a sequence."""
    sizes = [activation_bytes(part, spec) for part in parts]
    at_once = max(size for _, size in sizes)
    held = sum(size for size, _ in sizes)
    if home == DEVICE_ACTIVATIONS:
        return held + at_once
    residuals = [residual_bytes(part, spec) for part in parts]
    prefill = held - sum(residuals) + RESIDUAL_SLOTS * max(residuals)
    decode = sum(len(part) for part in parts) * spec.hidden_size * spec.dtype.itemsize * (2 + spec.top_k)
    return max(prefill, decode) + at_once


def host_residual_bytes(parts: Sequence[Sequence[GenSequence]], spec: ModelSpec, home: str) -> int:
    """Host RAM a group's prefill residual streams take where they wait there (else 0)."""
    return 0 if home == DEVICE_ACTIVATIONS else sum(residual_bytes(part, spec) for part in parts)
