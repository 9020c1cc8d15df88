from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from crabplus.processor import (
    CLIP_MEAN,
    CLIP_STD,
    IGNORE_INDEX,
    ModularProcessor,
    OmniProcessor,
    qwen_patchify,
    smart_resize,
)
from crabplus.sample import Sample
from crabplus.tasks import get_task
from crabplus.tokenizer import SPECIAL
from PIL import Image
from transformers import WhisperFeatureExtractor
from transformers.models.clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil


@pytest.fixture(scope="module")
def omni_proc(tiny_omni):
    model, tok = tiny_omni
    return OmniProcessor(tok, model.config)


def test_image_patches_match_the_qwen2vl_pil_processor(omni_proc):
    frame = np.random.default_rng(1).integers(0, 256, (1, 61, 90, 3), dtype=np.uint8)
    ref = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 224 * 224})
    want = ref(images=[frame[0]], return_tensors="np")
    patches, grid = omni_proc.video_inputs(frame)
    assert grid == want["image_grid_thw"][0].tolist()
    np.testing.assert_allclose(patches, want["pixel_values"], atol=1e-6, rtol=0)


def _reference_video_patchify(video: torch.Tensor, p: int, tp: int, m: int) -> torch.Tensor:
    # The Qwen2-VL video processor's torch layout, restated: [B, F, C, H, W] -> [B, t*h*w, C*tp*p*p].
    B, F, C, H, W = video.shape
    if pad := -F % tp:
        video = torch.cat([video, video[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
        F += pad
    t, h, w = F // tp, H // p, W // p
    x = video.view(B, t, tp, C, h // m, m, p, w // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(B, t * h * w, C * tp * p * p)


@pytest.mark.parametrize("frames", [1, 3, 4])
def test_video_patch_layout_matches_the_reference(frames):
    video = np.random.default_rng(frames).standard_normal((frames, 3, 56, 84)).astype(np.float32)
    patches, grid = qwen_patchify(video, 14, 2, 2)
    want = _reference_video_patchify(torch.from_numpy(video)[None], 14, 2, 2)[0]
    assert grid == [(frames + 1) // 2, 4, 6]
    assert torch.equal(torch.from_numpy(patches), want)


def test_smart_resize_bounds():
    assert smart_resize(224, 224, 28, 56 * 56, 224 * 224) == (224, 224)
    h, w = smart_resize(720, 1280, 28, 56 * 56, 224 * 224)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 224 * 224
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 500, 28, 56 * 56, 224 * 224)


def test_audio_features_equal_omnis_full_window_padding(omni_proc):
    audio = (0.1 * np.random.default_rng(2).standard_normal(12345)).astype(np.float32)
    ours = omni_proc.audio_inputs(audio)
    ref = WhisperFeatureExtractor(feature_size=128, chunk_length=30, return_attention_mask=True)
    full = ref(audio, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="np")
    valid = int(full["attention_mask"][0].sum())
    assert ours.shape == (128, valid)
    np.testing.assert_allclose(ours, full["input_features"][0][:, :valid], atol=1e-5)


def test_placeholder_counts_and_label_masking(omni_proc, samples):
    proc, ids = omni_proc, omni_proc.ids
    item = proc(samples[0])
    x = item["input_ids"]
    grid = item["video_grid_thw"][0]
    assert int((x == ids["video"]).sum()) == int(grid.prod()) // 4
    assert int((x == ids["audio"]).sum()) == proc.audio_token_count(item["input_features"].shape[1])
    labels = item["labels"]
    target = [*proc.tokenizer.encode(samples[0].target, add_special_tokens=False), ids["im_end"]]
    n = len(target)
    assert labels[-n:].tolist() == target and (labels[:-n] == IGNORE_INDEX).all()
    prompt = proc.tokenizer.decode(x[:-n])
    assert prompt.startswith(f"{SPECIAL.im_start}system\n") and prompt.endswith(f"{SPECIAL.im_start}assistant\n")
    image = proc(samples[2])
    assert image["image_grid_thw"][0].tolist() == [1, 4, 6]  # 60x80 -> 56x84
    assert int((image["input_ids"] == ids["image"]).sum()) == 6


def test_inference_prompt_is_open_for_generation(omni_proc, samples):
    item = omni_proc(dataclasses.replace(samples[0], target=""))
    assert "labels" not in item
    assert omni_proc.tokenizer.decode(item["input_ids"][-8:]).endswith(f"{SPECIAL.im_start}assistant\n")


def test_placeholder_mismatch_is_refused(omni_proc, samples):
    bad = dataclasses.replace(samples[0], instruction=f"look {SPECIAL.audio} here")
    with pytest.raises(ValueError, match="placeholders"):
        omni_proc(bad)


def test_bad_media_is_refused(omni_proc, samples):
    with pytest.raises(ValueError, match="frames"):
        omni_proc(dataclasses.replace(samples[1], frames=np.zeros((2, 8, 8), np.uint8)))
    with pytest.raises(ValueError, match="audio"):
        omni_proc(dataclasses.replace(samples[3], audio=np.zeros(0, np.float32)))


def test_collate_pads_both_sides(omni_proc, samples):
    items = [omni_proc(s) for s in samples]
    right = omni_proc.collate(items)
    lengths = [len(it["input_ids"]) for it in items]
    assert right["input_ids"].shape == (4, max(lengths))
    assert right["attention_mask"].sum(1).tolist() == lengths
    assert right["input_features"].shape[0] == 3 and right["feature_attention_mask"].shape[0] == 3
    assert right["video_grid_thw"].shape == (2, 3) and right["image_grid_thw"].shape == (1, 3)
    short = lengths.index(min(lengths))
    assert (right["labels"][short, min(lengths) :] == IGNORE_INDEX).all()
    left = omni_proc.collate([omni_proc(dataclasses.replace(s, target="")) for s in samples], padding_side="left")
    assert (left["attention_mask"][:, -1] == 1).all()
    with pytest.raises(ValueError, match="mix"):
        omni_proc.collate([items[0], omni_proc(dataclasses.replace(samples[0], target=""))])


def test_modular_processor(tiny_modular, samples):
    model, tok = tiny_modular
    proc = ModularProcessor(tok, model.config)
    c = model.config
    item = proc(samples[0])
    assert item["pixel_values"].shape == (4, 3, c.image_size, c.image_size)
    assert item["input_features"].shape == (1, c.num_mel_bins, c.audio_frames)
    assert int((item["input_ids"] == c.video_token_id).sum()) == 4 * c.num_queries  # per frame, as Crab
    assert int((item["input_ids"] == c.audio_token_id).sum()) == c.num_queries
    frame = samples[0].frames[0]
    want = (frame.astype(np.float32) / 255 - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    resized = proc(dataclasses.replace(samples[0], frames=np.repeat(frame[None, :32, :32], 2, 0)))
    np.testing.assert_allclose(resized["pixel_values"][0].numpy(), want[:32, :32].transpose(2, 0, 1), atol=1e-6)
    batch = proc.collate([proc(s) for s in samples])
    assert batch["frames_per_visual"].tolist() == [4, 3, 1] and batch["pixel_values"].shape[0] == 8


def test_modular_frames_follow_crabs_squash_then_clip_processor(tiny_modular):
    # Crab (GeWu-Lab/Crab dataset/pretrain_dataset.py, unified_dataset.py) squashes every frame to a square first
    # (decord VideoReader(height=224, width=224); images Image.resize((224, 224))), then runs CLIPImageProcessor,
    # whose shortest-side resize and centre crop leave a square of its own size unchanged. So a non-square frame
    # is squashed, never centre-cropped; ours does the same in one step.
    model, tok = tiny_modular
    c = model.config
    frame = np.random.default_rng(3).integers(0, 256, (40, 72, 3), dtype=np.uint8)
    square = Image.fromarray(frame).resize((c.image_size, c.image_size))  # PIL's default resample, bicubic
    clip = CLIPImageProcessorPil(size={"shortest_edge": c.image_size}, crop_size=c.image_size)
    want = clip(images=[np.asarray(square)], return_tensors="np")["pixel_values"][0]
    got = ModularProcessor(tok, c)(Sample("ks", "What?", "", frame[None]))["pixel_values"][0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    cropped = clip(images=[frame], return_tensors="np")["pixel_values"][0]  # what a crop would give instead
    assert np.abs(got - cropped).max() > 0.1


# --- the authors' user turn (issue 15 items 1-3) -------------------------------------------------------------------
# Their loader (GeWu-Lab/Crab_Plus dataset/qwen2_5_omni/omni_dataset.py) builds the user content as
# [preamble text, media items in the subset's order, instruction text]; Qwen2.5-Omni's chat template joins the items
# with nothing between them and renders each medium as <|audio_bos|><|AUDIO|><|audio_eos|> or
# <|vision_bos|><|VIDEO|><|vision_eos|> (<|IMAGE|> for images); a2v's two videos are then merged into the last video
# placeholder and v2a's two audios into the last audio placeholder (``text.replace(PLACEHOLDER, '', n - 1)``).
_AUDIO = f"{SPECIAL.audio_bos}{SPECIAL.audio}{SPECIAL.audio_eos}"
_VIDEO = f"{SPECIAL.vision_bos}{SPECIAL.video}{SPECIAL.vision_eos}"
_IMAGE = f"{SPECIAL.vision_bos}{SPECIAL.image}{SPECIAL.vision_eos}"
AUTHORS_USER_TURNS = {
    "a2v": "These are two videos and an audio:" + _AUDIO + _VIDEO
    + "Please listen to the audio and indicate which of the two videos matches what you hear.",
    "v2a": "This is a video and two audio clips:" + _VIDEO + _AUDIO
    + "Please view the video and indicate which of the two audio clips matches what you see.",
    "ks": "This is a video and an audio:" + _VIDEO + _AUDIO + "Please identify the action taking place in the video.",
    "s4": "This is an image and an audio:" + _IMAGE + _AUDIO + "Please identify the category of the object producing "
    "the sound in the video frame. Then, provide the bounding box and three pixel points of the object that is making "
    "the sound within the frame.",
}  # fmt: skip


def _user_turn(proc, ids) -> str:
    text = proc.tokenizer.decode(ids)
    for token in (SPECIAL.audio, SPECIAL.video, SPECIAL.image):
        text = re.sub(f"(?:{re.escape(token)})+", token, text)  # one placeholder per medium, as before expansion
    return text.split(f"{SPECIAL.im_start}user\n", 1)[1].split(SPECIAL.im_end, 1)[0]


@pytest.mark.parametrize("subset", sorted(AUTHORS_USER_TURNS))
def test_user_turn_is_preamble_media_in_the_authors_order_then_instruction(omni_proc, subset):
    spec = get_task(subset)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (1 if spec.uses_image else 4, 56, 56, 3), dtype=np.uint8)
    sample = Sample(subset, spec.instruction, "", frames, (0.1 * rng.standard_normal(16000)).astype(np.float32))
    assert _user_turn(omni_proc, omni_proc(sample)["input_ids"]) == AUTHORS_USER_TURNS[subset]


def test_video_timing_defaults_to_the_authors_one_fps(omni_proc, samples):
    # Their processor: fps None -> [1.0] * len(videos); video_second_per_grid = temporal_patch_size / fps = 2 / 1.
    assert omni_proc(samples[0])["video_second_per_grid"].tolist() == [2.0]
    timed = dataclasses.replace(samples[0], meta={"fps": 4.0})
    assert omni_proc(timed)["video_second_per_grid"].tolist() == [0.5]
