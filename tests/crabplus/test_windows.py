"""The authors' per-task audio windows (``process_audio_by_task``, GeWu-Lab/Crab_Plus
``dataset/qwen_omni_utils/v2_5/audio_process.py``), on small inputs whose expected cuts are worked out from their code.

A sample rate of 10 keeps the arrays small: their code reads ``sr`` only for the 1-second and 4-second paddings, and
otherwise works in fractions of the clip's length.
"""

from __future__ import annotations

import numpy as np
import pytest
from crabplus.data.windows import task_audio
from crabplus.tasks import EMOTION_SUBSETS, SUBSETS

SR = 10


def _ramp(n: int) -> np.ndarray:
    return np.arange(1, n + 1, dtype=np.float32)


def test_avqa_takes_ten_two_unit_windows_at_0_6_to_54():
    # len 600 -> nums_per_second = int(600 / 60) = 10; window i: audio[int((i - 0.5) * 10) : int(10 * (i + 1.5))],
    # the first one (start clamped to 0) padded at its front with 5 zeros to 2 * 10 samples.
    audio = _ramp(600)
    want = [np.concatenate([np.zeros(5, np.float32), audio[0:15]])]
    want += [audio[int((i - 0.5) * 10) : int(10 * (i + 1.5))] for i in range(6, 60, 6)]
    got = task_audio(audio, "avqa", sample_rate=SR)
    assert len(got) == 200
    np.testing.assert_array_equal(got, np.concatenate(want))
    assert got[20] == audio[55] and got[-1] == audio[554]


@pytest.mark.parametrize("subset", EMOTION_SUBSETS)
def test_emotion_subsets_take_the_first_four_seconds_padded(subset):
    long = _ramp(57)  # 5.7 s: segments [0:10], [10:20], [20:30], [30:40]
    np.testing.assert_array_equal(task_audio(long, subset, sample_rate=SR), long[:40])
    short = _ramp(23)  # 2.3 s: [0:10], [10:20], [20:23] + 7 zeros, then 10 zeros
    np.testing.assert_array_equal(task_audio(short, subset, sample_rate=SR), np.r_[short, np.zeros(17, np.float32)])


@pytest.mark.parametrize(("subset", "parts"), [("ks", 10), ("a2v", 10), ("avcap", 10), ("arig", 5)])
def test_equal_part_subsets_drop_the_remainder(subset, parts):
    audio = _ramp(47)  # int(47 / parts) samples per part, parts of them
    np.testing.assert_array_equal(task_audio(audio, subset, sample_rate=SR), audio[: parts * (47 // parts)])


def test_every_audio_is_padded_to_one_second_first():
    # 4 samples < sr = 10: padded to 10, then ks cuts 10 parts of 1 sample
    np.testing.assert_array_equal(task_audio(_ramp(4), "ks", sample_rate=SR), np.r_[_ramp(4), np.zeros(6)])
    # s4 on the padded second: part 1 of 5 is samples [2:4]
    np.testing.assert_array_equal(task_audio(_ramp(7), "s4", part=1, sample_rate=SR), [3, 4])


@pytest.mark.parametrize(("subset", "parts"), [("s4", 5), ("ms3", 5), ("ref_avs", 10)])
def test_segmentation_subsets_take_the_labelled_part(subset, parts):
    audio = _ramp(103)
    step = 103 // parts
    for part in (0, parts - 1):
        want = audio[part * step : (part + 1) * step]
        np.testing.assert_array_equal(task_audio(audio, subset, part=part, sample_rate=SR), want)
    with pytest.raises(ValueError, match="outside"):
        task_audio(audio, subset, part=parts, sample_rate=SR)
    with pytest.raises(ValueError, match="frame index"):  # no part given is an error, never part 0
        task_audio(audio, subset, sample_rate=SR)


def test_every_subset_has_a_rule():
    for subset in SUBSETS:
        assert len(task_audio(_ramp(120), subset, part=0, sample_rate=SR)) > 0
