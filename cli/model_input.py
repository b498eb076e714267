"""The model a command reads, as an input of its output check: ``--model``, or the built-in demo.

``run`` and ``bench`` without ``--model`` read the demo's directory in the user's cache. That
directory is their model input just as a ``--model`` directory is: read whole, so no output of the
command may be written inside it (:func:`klotski_tier.core.atomic.check_outputs`). Its path is
known before it is built, so the check comes before any work, the build included.
"""

from __future__ import annotations

from pathlib import Path

from klotski_tier.core.demo.build import demo_model_path

DEMO_LABEL = "the demo model"
"""How an output check names the demo's directory (the user gave no option for it)."""

MODEL_DIRECTORIES = frozenset({"--model", DEMO_LABEL})
"""The labels of a command's model input: a directory read whole (``check_outputs``' ``directories``)."""


def model_input(model: Path | None) -> dict[str, Path]:
    """``{label: directory}`` of the model a command reads: ``--model``, else the demo's directory."""
    return {"--model": model} if model is not None else {DEMO_LABEL: demo_model_path()}
