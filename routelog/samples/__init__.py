"""A small collapsing run shipped inside the package, so every installation can try routelog.

``scripts/make_samples.py`` writes it; ``routelog demo`` analyzes it and ``routelog demo --path``
prints where it is. Layers 2 and 3 of its 4 layers (8 experts, top-2) collapse at step 500.
"""

from __future__ import annotations

from pathlib import Path

SAMPLE_TOP_K = 2
"""The sample's k: its routers picked 2 experts per token (the logits do not say so)."""


def sample_path() -> Path:
    """The directory of the packaged sample run (a routelog run directory)."""
    return Path(__file__).resolve().parent / "collapse"
