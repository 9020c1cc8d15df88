"""Shared tiny models and samples for the crabplus model-side tests (session-scoped: built once)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from crabplus.sample import Sample


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Training sets torch's thread count for the process (``train.threads``); later tests must not inherit it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def make_samples(seed: int = 0, target: bool = True) -> list[Sample]:
    """A video+audio sample, a video-only one with an odd frame count and size, an image one, an audio-only one."""
    rng = np.random.default_rng(seed)
    frames = lambda f, h, w: rng.integers(0, 256, (f, h, w, 3), dtype=np.uint8)  # noqa: E731
    audio = lambda n: (0.1 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    t = (lambda s: s) if target else (lambda s: "")
    return [
        Sample("ave", "What happens?", t("The event is <event> dog </event>."), frames(4, 56, 56), audio(16000)),
        Sample("ks", "Identify the action.", t("guitar"), frames(3, 70, 50)),
        Sample("s4", "Segment the sounding object.", t("[10,20,30,40]"), frames(1, 60, 80), audio(4000)),
        Sample("meld", "Emotion?", t("happy"), audio=audio(24000)),
    ]


@pytest.fixture(scope="session")
def samples() -> list[Sample]:
    return make_samples()


@pytest.fixture(scope="session")
def tiny_omni():
    from crabplus.models.omni import build_tiny_omni

    return build_tiny_omni()


@pytest.fixture(scope="session")
def tiny_modular():
    from crabplus.models.modular import build_tiny_modular

    return build_tiny_modular()
