"""The authors' per-task audio windows: which part of a subset's audio the model hears.

Follows ``process_audio_by_task`` in ``dataset/qwen_omni_utils/v2_5/audio_process.py`` of GeWu-Lab/Crab_Plus, after
its ``librosa.load(path, sr=16000, mono=True)``:

- every audio is first padded with silence to at least one second;
- ``avqa``: ten 2-second windows ``[s - 0.5, s + 1.5)`` for ``s = 0, 6, ..., 54``, with a "second" being 1/60 of the
  clip (``int(len / 60)`` samples); the first window is padded at its start to two "seconds";
- ``avqa_thu, ks, ucf, avvp, ave, a2v, v2a, unav, avcap``: ten equal parts of ``int(len / 10)`` samples (the clip
  minus its last ``len % 10`` samples); ``arig`` the same with five parts;
- the emotion subsets (``mer24, meld, dfew, mafw, cremad``): the first 4 s, padded with silence to 4 s;
- ``s4, ms3`` (five parts) and ``ref_avs`` (ten parts): the part of the labelled frame (``int(len / parts)``
  samples). Their training loader always passes part 0 for ``s4`` (its test loader the record's ``frame_idx``).

v2a's two audios are each cut by the rule, then concatenated, as their ``__getitem__`` does.
"""

from __future__ import annotations

import numpy as np

from crabplus.sample import AUDIO_SAMPLE_RATE
from crabplus.tasks import EMOTION_SUBSETS, get_task

AVQA_CLIP_UNITS = 60
AVQA_WINDOW_STARTS = tuple(range(0, 60, 6))
EMOTION_SECONDS = 4
_EQUAL_PARTS = {"arig": 5, **dict.fromkeys(("avqa_thu", "ks", "ucf", "avvp", "ave", "a2v", "v2a", "unav", "avcap"), 10)}


def _pad_to(audio: np.ndarray, n: int, front: bool = False) -> np.ndarray:
    if len(audio) >= n:
        return audio
    silence = np.zeros(n - len(audio), audio.dtype)
    return np.concatenate([silence, audio] if front else [audio, silence])


def _avqa(audio: np.ndarray) -> np.ndarray:
    unit = int(len(audio) / AVQA_CLIP_UNITS)
    windows = []
    for s in AVQA_WINDOW_STARTS:
        start, end = max(0, s - 0.5), min(AVQA_CLIP_UNITS, s + 1.5)
        window = audio[int(start * unit) : int(unit * end)]
        if s - 0.5 < 0:
            window = _pad_to(window, 2 * unit, front=True)
        if s + 1.5 > AVQA_CLIP_UNITS:
            window = _pad_to(window, 2 * unit)
        windows.append(window)
    return np.concatenate(windows)


def task_audio(
    audio: np.ndarray, subset: str, part: int | None = None, sample_rate: int = AUDIO_SAMPLE_RATE
) -> np.ndarray:
    """The window of mono ``audio`` that ``subset``'s model input holds (see the module docstring).

    ``part`` is the frame index of the segmentation subsets (``TaskSpec.audio_segments`` parts), required there; it
    must lie in ``[0, parts)``: the authors' code feeds silence past the last part, this refuses with a ``ValueError``
    instead (and when ``part`` is None, where theirs raises ``KeyError`` reading the record).
    Raises ``KeyError`` for an unknown subset.
    """
    spec = get_task(subset)
    audio = _pad_to(np.asarray(audio, np.float32), sample_rate)
    if subset == "avqa":
        return _avqa(audio)
    if subset in EMOTION_SUBSETS:
        return _pad_to(audio[: EMOTION_SECONDS * sample_rate], EMOTION_SECONDS * sample_rate)
    if subset in _EQUAL_PARTS:
        parts = _EQUAL_PARTS[subset]
        return audio[: parts * int(len(audio) / parts)]
    if spec.audio_segments:
        parts, index = spec.audio_segments, part
        if index is None:
            raise ValueError(f"{subset}: needs the frame index of the audio part heard (part=), got none")
        if not 0 <= index < parts:
            raise ValueError(f"{subset}: frame index {index} outside the {parts} audio parts")
        step = int(len(audio) / parts)
        return audio[index * step : (index + 1) * step]
    raise AssertionError(f"no audio window rule for subset {subset!r}")
