"""Fixtures shared by the whole test suite.

The user's cache (``~/.cache/klotski-tier``: demo model, machine profile) is replaced by an
empty one for the whole session.

``checkpoint_factory(family, **kwargs)`` returns the directory of a tiny real checkpoint built by
:func:`tests.checkpoints.make_checkpoint` with those arguments. Directories are cached for the
session by their arguments, so many tests can share one build: treat them as read-only, and
copy one (``shutil.copytree``) before corrupting it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.checkpoints import make_checkpoint

CheckpointFactory = Callable[..., Path]
BENCH_PROFILE = Path(__file__).parent / "data" / "machine-profile.json"  # a real CPU bench profile


@pytest.fixture(autouse=True, scope="session")
def own_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test reads the user's cache: its machine profile would change what `run --plan auto` does.
    Tests that need their own cache still set ``KLOTSKI_TIER_CACHE`` themselves."""
    patch = pytest.MonkeyPatch()
    patch.setenv("KLOTSKI_TIER_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    patch.undo()


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache of this test's own, empty: no machine profile where `klotski-tier bench` would write one."""
    monkeypatch.setenv("KLOTSKI_TIER_CACHE", str(tmp_path / "cache"))


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
