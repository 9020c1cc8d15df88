"""The benchmark grids, defined once: ``run.py`` and ``bench_routed_lora.py`` both read them from here."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .flops import MODES
from .providers import PRESETS, SHAPES


@dataclass(frozen=True)
class Grid:
    """Which (shape, tokens, mode) cases a run times, and how many interleaved rounds."""

    shapes: tuple[str, ...]
    tokens: tuple[int, ...]
    modes: tuple[str, ...]
    rounds: int = 15


# The quick subset: the two shapes with targets, decode-ish and training token counts, inference and training.
QUICK = Grid(shapes=("crabplus", "moe"), tokens=(16, 2048), modes=("fwd", "fwd+bwd"))
FULL = Grid(shapes=tuple(SHAPES), tokens=(1, 16, 2048, 8192), modes=MODES)
# Every preset as a layer shape, at a decode-ish and a training token count (``--presets``).
PRESET_GRID = Grid(shapes=PRESETS, tokens=(16, 2048), modes=("fwd", "fwd+bwd"))


def layer_size(device: str) -> tuple[int, torch.dtype]:
    """``(d, dtype)`` of the layer problems on ``device``: a 7B model's width in bf16 on a GPU; on CPU d = 1024 in
    float32 (CPU bf16 GEMMs are not what a CPU user runs, and d = 4096 takes minutes per case)."""
    return (4096, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
