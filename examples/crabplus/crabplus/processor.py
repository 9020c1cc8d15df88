"""Turn a ``Sample`` (frames, audio, instruction, target) into model inputs, and pad a list of them into a batch.

The prompt is the Qwen chat format, as the authors' loader renders it (``dataset/qwen2_5_omni/omni_dataset.py``
through Qwen2.5-Omni's chat template, which joins the user items with nothing between them)::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{preamble}{media}{instruction}<|im_end|>\\n<|im_start|>assistant\\n

followed, in training, by ``{target}<|im_end|>``; labels cover only those target tokens (``-100`` elsewhere). With an
empty target the prompt ends with the assistant header open, ready for ``generate``. ``{preamble}`` is the subset's
("This is a video and an audio:", ...) and ``{media}`` its placeholders in the registry's order
(``TaskSpec.prompt_media``: a2v puts the audio first, then its two videos as one clip): ``<|vision_bos|>`` + video
(or image, for a single frame) placeholders + ``<|vision_eos|>``, and ``<|audio_bos|>`` + audio placeholders +
``<|audio_eos|>``, each placeholder expanded to exactly the number of features the model injects there; the expanded
counts are checked. Videos are timed at ``Sample.meta["fps"]`` frames per second, else ``ProcessorConfig.fps``
(``VIDEO_FPS``, 1.0, the authors' processor default).

- ``OmniProcessor`` (Qwen2.5-Omni thinker): frames resized with Qwen2-VL's ``smart_resize``, normalized with the CLIP
  mean/std and patched as the Qwen2-VL processor does (temporal patch 2, patch 14, merge 2), without torchvision;
  audio through ``WhisperFeatureExtractor`` (128 mel bins).
- ``ModularProcessor`` (the Crab paradigm): frames -> CLIP/SigLIP ``pixel_values``, squashed to the encoder's square
  size (bicubic, no crop: Crab resizes frames to 224 x 224 before ``CLIPImageProcessor``, whose shortest-side resize
  and centre crop then do nothing), audio -> Whisper features over the encoder's fixed window; each frame and each
  audio takes ``num_queries`` placeholders (the Q-Former's outputs).

``processor(sample)`` returns a dict of tensors for one sample; ``processor.collate(items, padding_side=...)`` pads
them into a batch (``"left"`` for batched generation).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase, WhisperFeatureExtractor

from .models.config import ProcessorConfig
from .sample import AUDIO_SAMPLE_RATE, Sample
from .tasks import get_task
from .tokenizer import SPECIAL, special_token_ids

IGNORE_INDEX = -100
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of ``factor``, area within ``[min_pixels, max_pixels]``."""
    if min(height, width) < 1 or max(height, width) / min(height, width) > 200:
        raise ValueError(f"frame size {height}x{width} is empty or has an aspect ratio above 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_normalize(frames: np.ndarray, size: tuple[int, int], mean, std) -> np.ndarray:
    """``[F, H, W, 3]`` uint8 -> ``[F, 3, h, w]`` float32: PIL bicubic, ``/255``, ``(x - mean) / std``.

    The same operations, in the same precision, as the transformers PIL image processors.
    """
    h, w = size
    out = []
    for frame in frames:
        if frame.shape[:2] != (h, w):
            frame = np.asarray(Image.fromarray(frame).resize((w, h), resample=Image.Resampling.BICUBIC))
        out.append(frame)
    x = (np.stack(out).astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def qwen_patchify(video: np.ndarray, patch: int, temporal_patch: int, merge: int) -> tuple[np.ndarray, list[int]]:
    """``[F, C, H, W]`` -> ``([t*h*w, C*tp*p*p], [t, h, w])`` in the Qwen2-VL order (merge windows contiguous).

    Frames are padded to a multiple of the temporal patch by repeating the last one, as the reference does.
    """
    if pad := -video.shape[0] % temporal_patch:
        video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
    F, C, H, W = video.shape
    t, h, w = F // temporal_patch, H // patch, W // patch
    x = video.reshape(t, temporal_patch, C, h // merge, merge, patch, w // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(t * h * w, C * temporal_patch * patch * patch)), [t, h, w]


def _check_frames(frames: np.ndarray) -> np.ndarray:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"Sample.frames must be [F, H, W, 3] with F >= 1, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"Sample.frames must be uint8 RGB, got dtype {frames.dtype}")
    return frames


def _check_audio(audio: np.ndarray) -> np.ndarray:
    if audio.ndim != 1 or audio.shape[0] == 0:
        raise ValueError(f"Sample.audio must be a non-empty mono waveform [n], got shape {audio.shape}")
    return audio.astype(np.float32, copy=False)


class ChatProcessor:
    """Prompt building, label masking and batching shared by both paradigms; subclasses turn media into tensors."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: ProcessorConfig | None = None):
        self.tokenizer = tokenizer
        self.config = config or ProcessorConfig()
        self.ids = special_token_ids(tokenizer)
        self.pad_id = self.ids["pad"]
        self.eos_id = self.ids["im_end"]

    def _enc(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _media(self, sample: Sample) -> tuple[dict[str, list[int]], dict[str, torch.Tensor], dict[int, int]]:
        """Placeholder ids per kind (``"visual"``, ``"audio"``), the media tensors, and the expected count per
        placeholder token id."""
        raise NotImplementedError

    def __call__(self, sample: Sample) -> dict[str, torch.Tensor]:
        """One sample's inputs; ``labels`` only when ``sample.target`` is non-empty (training).

        Raises ``KeyError`` for a subset the registry does not know (its preamble and media order come from there).
        """
        spec = get_task(sample.subset)
        media_ids, tensors, expected = self._media(sample)
        S = SPECIAL
        prompt = self._enc(f"{S.im_start}system\n{self.config.system_prompt}{S.im_end}\n{S.im_start}user\n")
        prompt += self._enc(spec.preamble) if spec.preamble else []
        for kind in spec.prompt_media:
            prompt += media_ids.pop(kind, [])
        if media_ids:
            raise ValueError(f"sample {sample.meta or sample.subset!r}: {sample.subset} takes no {sorted(media_ids)}")
        prompt += self._enc(f"{sample.instruction}{S.im_end}\n{S.im_start}assistant\n")
        ids = prompt
        if sample.target:
            ids = prompt + self._enc(sample.target) + [self.eos_id]
        input_ids = torch.tensor(ids, dtype=torch.long)
        for token_id, want in expected.items():
            got = int((input_ids == token_id).sum())
            if got != want:
                name = self.tokenizer.convert_ids_to_tokens(token_id)
                raise ValueError(
                    f"sample {sample.meta or sample.subset!r}: {got} {name} placeholders for {want} features "
                    "(does the instruction or target contain placeholder tokens?)"
                )
        out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if sample.target:
            labels = input_ids.clone()
            labels[: len(prompt)] = IGNORE_INDEX
            out["labels"] = labels
        return {**out, **tensors}

    def collate(self, items: list[dict[str, torch.Tensor]], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Pad token sequences (``padding_side`` "right" for training, "left" for batched generation) and
        concatenate media tensors in sample order."""
        if not items:
            raise ValueError("collate got an empty list")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        has_labels = {"labels" in it for it in items}
        if len(has_labels) != 1:
            raise ValueError("collate got a mix of training items (with labels) and inference items (without)")
        length = max(len(it["input_ids"]) for it in items)
        fill = {"input_ids": self.pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch = {}
        for key in ("input_ids", "attention_mask", "labels"):
            if key not in items[0]:
                continue
            rows = []
            for it in items:
                pad = torch.full((length - len(it[key]),), fill[key], dtype=torch.long)
                rows.append(torch.cat([pad, it[key]] if padding_side == "left" else [it[key], pad]))
            batch[key] = torch.stack(rows)
        batch.update(self._collate_media(items))
        return batch

    def _collate_media(self, items: list[dict[str, torch.Tensor]], skip=()) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        keys = {k for it in items for k in it} - {"input_ids", "attention_mask", "labels", *skip}
        for key in sorted(keys):
            parts = [it[key] for it in items if key in it]
            out[key] = torch.cat(parts)
        return out

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Text of generated ids, special tokens dropped."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class OmniProcessor(ChatProcessor):
    """Inputs of ``Qwen2_5OmniThinkerForConditionalGeneration`` (see the module docstring)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, model_config, config: ProcessorConfig | None = None):
        super().__init__(tokenizer, config)
        vision = model_config.vision_config
        self.patch, self.temporal_patch = vision.patch_size, vision.temporal_patch_size
        self.merge = vision.spatial_merge_size
        self.feature_extractor = WhisperFeatureExtractor(
            feature_size=model_config.audio_config.num_mel_bins,
            sampling_rate=AUDIO_SAMPLE_RATE,
            hop_length=160,
            n_fft=400,
            chunk_length=math.ceil(self.config.max_audio_seconds),
            return_attention_mask=True,
        )

    def video_inputs(self, frames: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """Patches ``[t*h*w, 3*2*14*14]`` and grid ``[t, h, w]`` of one clip (or one image, F == 1)."""
        frames = _check_frames(frames)
        size = smart_resize(*frames.shape[1:3], self.patch * self.merge, self.config.min_pixels, self.config.max_pixels)
        video = resize_normalize(frames, size, CLIP_MEAN, CLIP_STD)
        return qwen_patchify(video, self.patch, self.temporal_patch, self.merge)

    def audio_inputs(self, audio: np.ndarray) -> np.ndarray:
        """Log-mel features ``[mel, frames]`` of the valid frames only.

        Padding past ``n_fft`` samples beyond the end leaves the valid frames equal to Omni's 300 s padding, so
        the extractor pads only that far.
        """
        audio = _check_audio(audio)[: self.feature_extractor.n_samples]
        fe = self.feature_extractor
        max_length = min(fe.n_samples, math.ceil(len(audio) / fe.hop_length) * fe.hop_length + fe.n_fft)
        feats = fe(
            audio, sampling_rate=AUDIO_SAMPLE_RATE, padding="max_length", max_length=max_length,
            return_attention_mask=True, return_tensors="np",
        )  # fmt: skip
        valid = int(feats["attention_mask"][0].sum())
        return feats["input_features"][0][:, :valid]

    @staticmethod
    def audio_token_count(num_frames: int) -> int:
        """Audio tower outputs for ``num_frames`` mel frames (conv stride 2, then average pooling by 2)."""
        return ((num_frames - 1) // 2 + 1 - 2) // 2 + 1

    def _media(self, sample: Sample):
        ids, tensors, expected = {}, {}, {}
        if sample.frames is not None:
            patches, grid = self.video_inputs(sample.frames)
            is_image = sample.frames.shape[0] == 1
            n = grid[0] * grid[1] * grid[2] // self.merge**2
            token = self.ids["image" if is_image else "video"]
            ids["visual"] = [self.ids["vision_bos"], *[token] * n, self.ids["vision_eos"]]
            expected[token] = n
            if is_image:
                tensors["pixel_values"] = torch.from_numpy(patches)
                tensors["image_grid_thw"] = torch.tensor([grid])
            else:
                fps = float(sample.meta.get("fps", self.config.fps))
                tensors["pixel_values_videos"] = torch.from_numpy(patches)
                tensors["video_grid_thw"] = torch.tensor([grid])
                tensors["video_second_per_grid"] = torch.tensor([self.temporal_patch / fps], dtype=torch.float32)
        if sample.audio is not None:
            feats = self.audio_inputs(sample.audio)
            n = self.audio_token_count(feats.shape[1])
            ids["audio"] = [self.ids["audio_bos"], *[self.ids["audio"]] * n, self.ids["audio_eos"]]
            expected[self.ids["audio"]] = n
            tensors["input_features"] = torch.from_numpy(feats)
            tensors["feature_attention_mask"] = torch.ones(feats.shape[1], dtype=torch.long)
        return ids, tensors, expected

    def _collate_media(self, items, skip=()):
        out = super()._collate_media(items, skip={"input_features", "feature_attention_mask"})
        audio = [it["input_features"] for it in items if "input_features" in it]
        if audio:
            length = max(f.shape[1] for f in audio)
            feats = torch.zeros(len(audio), audio[0].shape[0], length)
            mask = torch.zeros(len(audio), length, dtype=torch.long)
            for i, f in enumerate(audio):
                feats[i, :, : f.shape[1]] = f
                mask[i, : f.shape[1]] = 1
            out["input_features"], out["feature_attention_mask"] = feats, mask
        return out


class ModularProcessor(ChatProcessor):
    """Inputs of ``CrabModularModel``: ``pixel_values`` + ``frames_per_visual``, ``input_features`` (Whisper)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, model_config, config: ProcessorConfig | None = None):
        super().__init__(tokenizer, config)
        self.model_config = model_config
        hop = 160
        seconds = model_config.audio_frames * hop / AUDIO_SAMPLE_RATE
        self.feature_extractor = WhisperFeatureExtractor(
            feature_size=model_config.num_mel_bins, sampling_rate=AUDIO_SAMPLE_RATE, hop_length=hop, n_fft=400,
            chunk_length=seconds,
        )  # fmt: skip
        self.feature_extractor.n_samples = model_config.audio_frames * hop  # exact even for fractional seconds
        self.feature_extractor.nb_max_frames = model_config.audio_frames

    def _media(self, sample: Sample):
        c = self.model_config
        ids, tensors, expected = {}, {}, {}
        if sample.frames is not None:
            frames = _check_frames(sample.frames)
            size = (c.image_size, c.image_size)
            tensors["pixel_values"] = torch.from_numpy(resize_normalize(frames, size, c.image_mean, c.image_std))
            tensors["frames_per_visual"] = torch.tensor([frames.shape[0]])
            token = c.image_token_id if frames.shape[0] == 1 else c.video_token_id
            n = frames.shape[0] * c.num_queries  # one Q-Former pass per frame, as Crab
            ids["visual"] = [self.ids["vision_bos"], *[token] * n, self.ids["vision_eos"]]
            expected[token] = n
        if sample.audio is not None:
            # Whisper sees a fixed window (30 s for the real model): longer audio is truncated, shorter padded.
            feats = self.feature_extractor(
                _check_audio(sample.audio), sampling_rate=AUDIO_SAMPLE_RATE, padding="max_length",
                truncation=True, return_tensors="np",
            )["input_features"]  # fmt: skip
            tensors["input_features"] = torch.from_numpy(feats)
            ids["audio"] = [self.ids["audio_bos"], *[c.audio_token_id] * c.num_queries, self.ids["audio_eos"]]
            expected[c.audio_token_id] = c.num_queries
        return ids, tensors, expected
