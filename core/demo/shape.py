"""The demo model's dimensions and routing structure, and the Mixtral constants its config uses.

Read by the builder (:mod:`klotski_tier.core.demo.build`) and by the planner's catalogue of model
shapes (:mod:`klotski_tier.core.plan.shapes`), which studies the demo without building it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from klotski_tier.core.errors import ConfigError

MAX_ROUTING_LOGIT = 30.0  # a larger bonus only makes routing deterministic, and logits huge in bf16
RMS_NORM_EPS = 1e-5  # Mixtral's epsilon
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in Mistral's tokenizer
UNK_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID = 0, 1, 2
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # the special tokens and one token per byte


@dataclass(frozen=True)
class DemoShape:
    """Mixtral dimensions of a demo checkpoint (element counts)."""

    vocab_size: int  # V: the tokenizer is trained to exactly this many ids, the model emits as many
    hidden_size: int  # H
    num_layers: int
    num_experts: int  # E routed experts per layer
    top_k: int  # experts per token
    intermediate_size: int  # I: one expert is three [I, H] / [H, I] matrices
    num_heads: int  # Hq
    num_kv_heads: int  # Hkv < Hq: grouped-query attention, as in Mixtral
    max_position_embeddings: int  # longest sequence (prompt + generated tokens)
    rope_theta: float  # RoPE base frequency

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{self}: hidden_size must divide by num_heads, num_heads by num_kv_heads")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"{self}: top_k must be between 1 and num_experts")
        if self.hidden_size <= self.num_experts:
            raise ConfigError(f"{self}: hidden_size must exceed num_experts (routing uses 1 + E coordinates)")

    @property
    def head_dim(self) -> int:
        """D: hidden size per attention head."""
        return self.hidden_size // self.num_heads

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert in bf16 (w1, w2, w3)."""
        return 3 * self.hidden_size * self.intermediate_size * torch.bfloat16.itemsize


DEMO_SHAPE = DemoShape(
    vocab_size=1024,  # the corpus below yields up to ~1260 ids; tiny next to Mixtral's 32000
    hidden_size=512,  # big enough that each expert matrix is a real GEMM, 1/8 of Mixtral's 4096
    num_layers=8,  # enough layers for prefetching one layer ahead to matter
    num_experts=8,  # Mixtral's 8 experts ...
    top_k=2,  # ... top-2 routed, so 3/4 of the experts of a layer are idle per token
    intermediate_size=1792,  # 3.5 x H like Mixtral (14336 / 4096): one expert is 5.25 MiB
    num_heads=8,  # head_dim 64
    num_kv_heads=4,  # GQA: two query heads share one KV head
    max_position_embeddings=2048,  # plenty for the demo prompts and a few hundred new tokens
    rope_theta=1e6,  # Mixtral's RoPE base
)
"""The shipped demo: ~367 MB in bf16, 64 experts of 5.25 MiB, so a 128 MiB budget holds about a third."""


@dataclass(frozen=True)
class DemoRouting:
    """How the demo's routers pick experts: skew within a layer, correlation between layers.

    Random routers spread tokens almost uniformly and independently per layer, which makes every
    prefetcher look alike. The demo's weights are chosen with structure instead (the checkpoint stays
    an ordinary Mixtral one). The residual stream reserves 1 + E *routing coordinates*, drawn at
    random (like the few outsized dimensions of trained LLMs): a common one c that every token's
    embedding holds, and type coordinates u_0 .. u_{E-1}, of which each token id's embedding holds
    one (its *type*, drawn once per id). No other matrix reads or writes them (attention, experts
    and lm_head have zeros there), so they reach every layer's router unchanged while the rest of
    the residual stream evolves freely. RMSNorm only rescales them. Router row e of layer l is a
    random row elsewhere (logits of std ~1, independent between layers) plus two structured parts,
    in logits per token, scaled for the residual's growth with depth (``SUBLAYER_MEAN_SQUARE``):

    - skew: ``hot_logit / (r + 1) ** hot_exponent`` along c, where r is e's rank in the layer's own
      random hot order: a few experts per layer get a large bonus for every token;
    - correlation: ``type_logit`` along u_j for the expert that type j prefers in layer l (a random
      permutation per layer): a token that took type j's expert in layer l - 1 tends to take type
      j's expert in layer l, a different but predictable one.

    ``DemoRouting(0, 1, 0)`` gives the old unstructured routing. Defaults: see ``DEMO_ROUTING``.
    """

    hot_logit: float  # logit bonus of each layer's hottest expert, for every token
    hot_exponent: float  # Zipf-like profile: the r-th hottest expert (r = 0, 1, ...) gets hot_logit/(r+1)^x
    type_logit: float  # logit bonus of the expert a token's type prefers in each layer

    def __post_init__(self) -> None:
        values = (self.hot_logit, self.hot_exponent, self.type_logit)
        if not all(math.isfinite(v) and 0.0 <= v <= MAX_ROUTING_LOGIT for v in values):
            raise ConfigError(f"{self}: every routing parameter must be between 0 and {MAX_ROUTING_LOGIT}")

    def hot_bonuses(self, num_experts: int) -> list[float]:
        """Logit bonus of the r-th hottest expert of a layer, r = 0 .. num_experts - 1."""
        return [self.hot_logit / (rank + 1) ** self.hot_exponent for rank in range(num_experts)]


DEMO_ROUTING = DemoRouting(hot_logit=2.25, hot_exponent=1.0, type_logit=3.0)
"""The shipped demo's routing, tuned with transformers (tests/core/demo/test_demo.py) to Mixtral-8x7B's skew
(the 2 busiest of 8 experts take ~0.5 of a layer's selections) and a strong link between consecutive
layers (a token's previous first choice predicts its next one ~70% of the time, frequency ~27%)."""
