"""The one exception tree of klotski-tier.

::

    KlotskiError                      base: the CLI turns it into a one-line message, exit 1
    ├── ConfigError                   an option or budget value is malformed or out of range
    │   └── BudgetError               a byte budget is below the minimum working set
    ├── CheckpointError               the model directory, a shard, a header or a tensor is wrong
    │   └── UnsupportedModelError     model_type or a config option we do not implement
    ├── InputError                    prompts: unreadable file, bad token ids, too long
    └── TierError                     a tier driver failed to move bytes (I/O error)

A miss is a value (``None``), a failure is one of these exceptions, an invariant is an
``assert`` with a message. Low-level errors (``OSError``, ``json.JSONDecodeError`` ...) are
translated once, where they happen, with ``raise ... from exc``. Every message says what is
wrong and what to do about it, in one line.
"""

from __future__ import annotations


class KlotskiError(Exception):
    """Base of every error klotski-tier raises on purpose."""


class ConfigError(KlotskiError):
    """An option or configuration value is malformed or out of range."""


class BudgetError(ConfigError):
    """A tier's byte budget cannot hold the minimum working set."""


class CheckpointError(KlotskiError):
    """The checkpoint directory or one of its files is missing, truncated or inconsistent."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint is readable but its model type or an option is not supported."""


class InputError(KlotskiError):
    """A prompt, prompt file or token id list cannot be used."""


class TierError(KlotskiError):
    """A tier driver failed to read, write or copy a block."""
