from __future__ import annotations

import numpy as np
import pytest
import torch
from crabplus.segment import Sam2Segmenter


@pytest.fixture(scope="module")
def seg():
    return Sam2Segmenter.tiny()


def test_coordinate_mapping_to_sam2_input(seg):
    assert seg.size == 64
    box = np.array([10.0, 20.0, 60.0, 80.0])
    np.testing.assert_allclose(seg.to_model_coords(box, (80, 120)), [10 * 64 / 120, 20 * 64 / 80, 32, 64])
    pts = np.array([[120.0, 0.0], [0.0, 80.0]])
    np.testing.assert_allclose(seg.to_model_coords(pts, (80, 120)), [[64, 0], [0, 64]])


def test_mask_is_upsampled_to_the_frame():
    logits = -torch.ones(16, 16)
    logits[4:8, 8:12] = 1.0  # a quarter-size mask region
    mask = Sam2Segmenter.upsample_mask(logits, (80, 120))
    ys, xs = np.nonzero(mask)
    assert mask.shape == (80, 120)
    # rows 4..8 of 16 -> 20..40 of 80, cols 8..12 of 16 -> 60..90 of 120 (bilinear edges within a pixel or two)
    assert abs(ys.min() - 20) <= 2 and abs(ys.max() - 39) <= 2 and abs(xs.min() - 60) <= 2 and abs(xs.max() - 89) <= 2


def test_segment_prompts_sam2_in_model_coordinates(seg, monkeypatch):
    frame = np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8)
    seen = {}
    forward = seg.model.forward

    def spy(**kwargs):
        seen.update(kwargs)
        return forward(**kwargs)

    monkeypatch.setattr(seg.model, "forward", spy)
    mask = seg.segment(frame, box=[10, 20, 60, 80], points=[[30, 40], [45, 50], [60, 60]])
    assert mask.shape == (80, 120) and mask.dtype == bool
    assert seen["pixel_values"].shape == (1, 3, 64, 64)
    torch.testing.assert_close(seen["input_boxes"], torch.tensor([[[10 * 64 / 120, 16.0, 32.0, 64.0]]]))
    assert seen["input_points"].shape == (1, 1, 3, 2) and seen["input_labels"].tolist() == [[[1, 1, 1]]]
    assert seg.segment(frame, points=[[30, 40]], multimask=True).shape == (80, 120)


def test_bad_prompts_are_refused(seg):
    frame = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="x2 > x1"):
        seg.segment(frame, box=[20, 5, 10, 30])
    with pytest.raises(ValueError, match="box"):
        seg.segment(frame, box=[1, 2, 3])
    with pytest.raises(ValueError, match="needs a box"):
        seg.segment(frame)
    with pytest.raises(ValueError, match="uint8"):
        seg.segment(frame.astype(np.float32), box=[1, 2, 3, 4])


def test_loads_from_a_local_directory(seg, tmp_path):
    seg.model.save_pretrained(tmp_path)
    loaded = Sam2Segmenter.from_pretrained(str(tmp_path))
    frame = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    assert np.array_equal(loaded.segment(frame, box=[5, 5, 40, 30]), seg.segment(frame, box=[5, 5, 40, 30]))
