"""The fixed workload every system runs: N prompts of exactly P tokens, G new tokens each, greedy.

Prompts are real text: prompt ``i`` is ``"<i>. "`` (so no two prompts are alike), demo prompt
``i mod 8``, then the demo prompts' words rotated by ``i``, encoded with the checkpoint's own
tokenizer (``<s>`` first, as Mistral's) and truncated to exactly P tokens.
Equal lengths keep every system free of padding, whose masked attention rounds differently in
bf16.

Throughput is what a user waits for: *generated tokens / total time*, where total time is
the prefill and every decode step (loading the model beforehand is not counted; nor is the
all-resident reference's preload). *Decode tokens/s* counts the tokens of decode steps only
(every generated token but each prompt's first) over the decode time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from klotski_tier.core.demo.tokenizer import demo_prompts
from klotski_tier.core.errors import ConfigError, InputError

FILLER_REPEATS = 64  # the rotated filler text, repeated: enough words for prompts of thousands of tokens


@dataclass(frozen=True)
class Workload:
    """N prompts of P tokens, G new tokens each, greedy."""

    prompts: int  # N
    prompt_tokens: int  # P
    new_tokens: int  # G

    def __post_init__(self) -> None:
        if min(self.prompts, self.prompt_tokens, self.new_tokens) < 1:
            raise ConfigError(f"prompts, prompt tokens and new tokens must be at least 1, got {self}")

    @property
    def generated_tokens(self) -> int:
        """Tokens the workload generates (no demo model ever emits EOS: see core/demo/build.py)."""
        return self.prompts * self.new_tokens

    def describe(self) -> str:
        return f"{self.prompts} prompts x {self.prompt_tokens} tokens, {self.new_tokens} new tokens, greedy"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_prompts(model_dir: Path, workload: Workload) -> list[list[int]]:
    """The workload's prompts as token ids, each exactly ``workload.prompt_tokens`` long."""
    tokenizer = _tokenizer(model_dir)
    texts = demo_prompts()
    words = " ".join(texts).split()
    prompts = []
    for index in range(workload.prompts):
        rotated = words[index % len(words) :] + words[: index % len(words)]
        text = f"{index}. {texts[index % len(texts)]} " + " ".join(rotated * FILLER_REPEATS)
        ids: list[int] = tokenizer.encode(text).ids
        if len(ids) < workload.prompt_tokens:
            raise InputError(
                f"the prompt text yields {len(ids)} tokens, fewer than {workload.prompt_tokens}; "
                "lower --prompt-tokens"
            )
        prompts.append(ids[: workload.prompt_tokens])
    return prompts


def _tokenizer(model_dir: Path) -> Tokenizer:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"{model_dir} has no tokenizer.json; the e2e benchmark builds prompts from text")
    return Tokenizer.from_file(str(path))


@dataclass(frozen=True)
class Throughput:
    """Generated tokens over the prefill and decode time of one run."""

    generated_tokens: int
    decode_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0
