"""Fixtures shared by the whole test suite.

``checkpoint_factory(family, **kwargs)`` returns the directory of a tiny real checkpoint built by
:func:`tests.checkpoints.make_checkpoint` with those arguments. Directories are cached for the
session by their arguments, so many tests can share one build: treat them as read-only, and
copy one (``shutil.copytree``) before corrupting it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.checkpoints import make_checkpoint

CheckpointFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory: pytest.TempPathFactory) -> CheckpointFactory:
    """``factory(family, **make_checkpoint_kwargs) -> Path``, cached by arguments for the session."""
    built: dict[str, Path] = {}

    def factory(family: str, **kwargs: Any) -> Path:
        key = repr((family, sorted(kwargs.items())))
        if key not in built:
            directory = tmp_path_factory.mktemp(f"ckpt-{family}")
            built[key] = make_checkpoint(directory, family, **kwargs)
        return built[key]

    return factory
