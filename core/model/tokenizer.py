"""A checkpoint's tokenizer (``tokenizer.json``), read with the tokenizers library."""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer

from klotski_tier.core import reads
from klotski_tier.core.errors import CheckpointError
from klotski_tier.core.units import MIB

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_KIND = reads.FileKind("tokenizer", 512 * MIB, CheckpointError, "fix or remove the file")
"""Tokenizers of 256k-token vocabularies are ~30 MiB: 512 MiB leaves room."""


def load_tokenizer(path: Path) -> Tokenizer | None:
    """The tokenizer at ``path``, or None without the file (token-id prompts still work)."""
    if not os.path.lexists(path):
        return None
    reads.check_file(path, TOKENIZER_KIND)  # the tokenizers library would block on a FIFO, read /dev/zero
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises plain Exception subclasses
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"cannot read tokenizer {path}: {reason}; fix or remove the file") from exc
