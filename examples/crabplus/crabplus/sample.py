"""The one record type every stage of the recipe passes along."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Sample:
    """One unified-interface example.

    ``frames`` are RGB uint8 ``[F, H, W, 3]`` (a still image is ``F == 1``); ``audio`` is float32 mono at
    ``AUDIO_SAMPLE_RATE``. ``target`` is the assistant's full answer text, reasoning included; it is empty at
    inference time. ``meta`` keeps the source record's identifiers (file, index, ids) for reports and predictions.
    """

    subset: str
    instruction: str
    target: str = ""
    frames: np.ndarray | None = None
    audio: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)


AUDIO_SAMPLE_RATE = 16_000

#: Frame rate the authors' Omni processor assumes for every video (``fps=None`` -> 1.0 in their
#: ``models/qwen2_5_omni/processing_qwen2_5_omni.py``): 2.0 s per temporal grid of 2 frames in TMRoPE, whatever
#: the clip's real sampling rate.
VIDEO_FPS = 1.0
