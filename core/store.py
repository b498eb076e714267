"""Packed expert stores: a checkpoint rewritten block by block, aligned for O_DIRECT.

A store is a directory::

    manifest.json     format tag and version, the model's config, one record per block
    blocks.bin        every block's bytes, each at a 4 KiB-aligned offset, padded to 4 KiB
    config.json, generation_config.json, tokenizer files   copied from the source, if present

A block's raw bytes are exactly its :class:`BlockLayout` buffer (each view at its buffer
offset, as :meth:`BlockLayout.tensors` reads it), so an uncompressed block is one read straight
into a block buffer. A compressed block holds those bytes through :mod:`klotski_tier.core.codec`
(zstd, byte-shuffled for 16-bit weights) and goes through :func:`decode_block`. Every block's
record in the manifest::

    {"kind": "expert", "layer": 3, "expert": 5, "offset": 1048576, "stored_bytes": 201543,
     "raw_bytes": 262144, "codec": "zstd", "level": 3, "shuffle": true,
     "checksum": "xxh3_64:<hex> of the stored bytes",
     "views": [{"role": "gate_up", "buffer_offset": 0, "dtype": "BF16", "shape": [96, 64]}, ...]}

``totals`` gives raw and stored bytes and their ratio, overall and per block kind, so that the
planner can tell whether decompression pays. :func:`pack` writes into a temporary sibling
directory, fsyncs it and renames it into place, so an interrupted pack leaves no valid-looking
store; :func:`open_store` checks the manifest and the size of ``blocks.bin`` before any block is
read, and :func:`decode_block` checks each block's checksum before anyone can use it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from klotski_tier.core import codec as codecs
from klotski_tier.core.blocks import BlockId, BlockKind, BlockLayout, TensorPiece, TensorView, align_up
from klotski_tier.core.checkpoint import SAFETENSORS_DTYPES, read_range
from klotski_tier.core.errors import CheckpointError, InputError, TierError
from klotski_tier.core.families import ExpertLayout, parse_spec
from klotski_tier.core.layouts import ModelFiles, load_model_files
from klotski_tier.core.spec import ModelSpec
from klotski_tier.core.store_manifest import (
    FORMAT_TAG,
    MANIFEST_FILE,
    ParsedBlock,
    manifest_record,
    parse_manifest,
    read_manifest,
)

logger = logging.getLogger(__name__)
