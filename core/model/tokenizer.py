"""A checkpoint's tokenizer (``tokenizer.json``), read with the tokenizers library."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from klotski_tier.core.errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(path: Path) -> Tokenizer | None:
    """The tokenizer at ``path``, or None without the file (token-id prompts still work)."""
    if not path.is_file():
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises plain Exception subclasses
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"cannot read tokenizer {path}: {reason}; fix or remove the file") from exc
