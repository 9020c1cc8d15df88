r"""Stage 2 of Crab+ segmentation: the box ``[x1,y1,x2,y2]`` and points ``[x,y]`` the LLM wrote prompt SAM2 for a mask.

Which answers prompt SAM2, and with what (``authors_prompt``), follows the authors' ``seg/scripts/inference_3.py``
(s4, ms3) and ``inference_ref_3.py`` (Ref-AVS) in GeWu-Lab/Crab_Plus on the raw answer text, with their exact
grammar: the text before the first ``</s>``, coordinates matched by ``\[(\d+),(\d+)(?:,(\d+),(\d+))?\]`` (integers,
no spaces: ``[35, 101, 90, 156]`` is no coordinate for them), the first box plus the last at most 3 points; for
s4/ms3 a box without points, or fewer than 3 points without a box, is invalid; for Ref-AVS the literal
``<answer>true</answer>`` is needed, ``<answer>false</answer>`` (anywhere, when coordinates cannot be read) is an
empty mask and a box alone suffices; every kept coordinate must lie in ``[0, COORD_SIZE)`` with ``x1 < x2``,
``y1 < y2``. Answers invalid there are excluded from the authors' mean (``crabplus.metrics`` reports both means).
``sam2_prompt`` applies the same rules to our tolerant parse (``crabplus.interface``: spaces allowed, answer tags in
any case); ``mask_prompt`` is the prompt a mask is made from: the authors' where their grammar reads the answer, else
ours, so the all-samples mean scores answers that only our parse reads.

Coordinates follow the one convention of ``crabplus.tasks`` (inclusive pixel indices, pixel centres at ``i + 0.5``):
``COORD_SIZE`` indices map to frame indices and on to SAM2's input indices through pixel centres
(``rescale_index``), and SAM2's prompt encoder adds the 0.5 back, so a prompt lands on the centre of the pixel it
names at every size. The frame is resized (not letterboxed) to SAM2's square input; SAM2's low-resolution mask
logits (a quarter of ``S``) are upsampled bilinearly straight to the frame size and thresholded at 0, as
``Sam2Processor`` does (it needs torchvision, hence the hand-written mapping).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import Sam2Config, Sam2Model

from crabplus.interface import Box, Point, Prediction, parse
from crabplus.tasks import COORD_SIZE, get_task, rescale_index

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def tiny_sam2_config() -> Sam2Config:
    """A 64x64-input SAM2 (about 120K parameters): HieraDet features at 16, 8 and 4 pixels, prompt grid 4x4."""
    backbone = dict(
        model_type="sam2_hiera_det_model", hidden_size=8, num_attention_heads=1, image_size=[64, 64],
        blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[8, 16, 32, 64], num_attention_heads_per_stage=[1, 1, 2, 2],
        window_size_per_stage=[4, 4, 4, 2], global_attention_blocks=[3],
        window_positional_embedding_background_size=[2, 2],
    )  # fmt: skip
    return Sam2Config(
        vision_config=dict(
            backbone_config=backbone, backbone_channel_list=[64, 32, 16, 8],
            backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]], fpn_hidden_size=32,
        ),
        prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
    )  # fmt: skip


def _as_xy(values: Sequence[float], n: int, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.shape[0] != n or not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} must be {n} finite numbers, got {values!r}")
    return arr


class Sam2Segmenter:
    """Prompt a ``Sam2Model`` with frame-pixel boxes and points; returns boolean masks at the frame's size."""

    def __init__(self, model: Sam2Model, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.model = model.eval()
        self.size = int(model.config.prompt_encoder_config.image_size)
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32) -> Sam2Segmenter:
        """SAM2 (e.g. SAM2.1 hiera-large in transformers format) from a local directory."""
        return cls(Sam2Model.from_pretrained(path, local_files_only=True, dtype=dtype))

    @classmethod
    def tiny(cls, seed: int = 0) -> Sam2Segmenter:
        torch.manual_seed(seed)
        return cls(Sam2Model(tiny_sam2_config()))

    def preprocess(self, frame: np.ndarray) -> torch.Tensor:
        """``[H, W, 3]`` uint8 -> ``[1, 3, S, S]``: bilinear resize, ``/255``, ImageNet normalization."""
        if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frame must be uint8 [H, W, 3], got {frame.dtype} {frame.shape}")
        img = np.asarray(Image.fromarray(frame).resize((self.size, self.size), resample=Image.Resampling.BILINEAR))
        x = (img.astype(np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(x.transpose(2, 0, 1).copy()).unsqueeze(0)

    def to_model_coords(self, xy: np.ndarray, frame_hw: tuple[int, int]) -> np.ndarray:
        """Frame pixel indices ``[..., 2k]`` (x, y pairs) -> SAM2 input pixel indices (through pixel centres)."""
        h, w = frame_hw
        return _rescale_xy(xy, (w, h), (self.size, self.size))

    @staticmethod
    def upsample_mask(logits: torch.Tensor, frame_hw: tuple[int, int]) -> np.ndarray:
        """Low-resolution mask logits ``[h, w]`` -> boolean mask ``[H, W]`` of the frame."""
        up = F.interpolate(logits[None, None].float(), size=tuple(frame_hw), mode="bilinear", align_corners=False)
        return (up[0, 0] > 0).cpu().numpy()

    @torch.no_grad()
    def segment(
        self,
        frame: np.ndarray,
        box: Sequence[float] | None = None,
        points: Sequence[Sequence[float]] = (),
        multimask: bool = False,
    ) -> np.ndarray:
        """The mask ``[H, W]`` (bool) of the object the box and/or foreground points designate, both given as frame
        pixel indices (inclusive box corners; floats allowed)."""
        if box is None and not points:
            raise ValueError("segment needs a box, points, or both")
        frame_hw = frame.shape[:2]
        kwargs = {}
        if box is not None:
            b = _as_xy(box, 4, "box [x1,y1,x2,y2]")
            if b[2] <= b[0] or b[3] <= b[1]:
                raise ValueError(f"box [x1,y1,x2,y2] must have x2 > x1 and y2 > y1, got {list(box)}")
            kwargs["input_boxes"] = torch.tensor(self.to_model_coords(b, frame_hw), dtype=torch.float32)[None, None]
        if points:
            p = np.stack([_as_xy(pt, 2, "point [x,y]") for pt in points])
            kwargs["input_points"] = torch.tensor(self.to_model_coords(p, frame_hw), dtype=torch.float32)[None, None]
            kwargs["input_labels"] = torch.ones(1, 1, len(points), dtype=torch.long)
        dtype = next(self.model.parameters()).dtype
        device = next(self.model.parameters()).device
        kwargs = {k: v.to(device) for k, v in kwargs.items()}
        out = self.model(pixel_values=self.preprocess(frame).to(device, dtype), multimask_output=multimask, **kwargs)
        masks, scores = out.pred_masks[0, 0], out.iou_scores[0, 0]  # [num_masks, h, w], [num_masks]
        return self.upsample_mask(masks[int(scores.argmax())], frame_hw)


def _rescale_xy(xy: np.ndarray, src_wh: tuple[int, int], dst_wh: tuple[int, int]) -> np.ndarray:
    xy = np.asarray(xy, dtype=np.float64)
    out = xy.copy()
    out[..., 0::2] = rescale_index(xy[..., 0::2], src_wh[0], dst_wh[0])
    out[..., 1::2] = rescale_index(xy[..., 1::2], src_wh[1], dst_wh[1])
    return out


@dataclass(frozen=True)
class SamPrompt:
    """What one answer prompts SAM2 with, in ``COORD_SIZE`` pixel indices. ``invalid`` says why the authors'
    evaluation leaves the answer out (then nothing prompts SAM2); a valid prompt without box and points is an
    answered absence (an empty mask)."""

    box: Box | None = None
    points: tuple[Point, ...] = ()
    invalid: str | None = None

    @property
    def empty(self) -> bool:
        return self.box is None and not self.points


def _out_of_range(box: Box | None, points: Sequence[Point]) -> str | None:
    if box is not None and not (0 <= box[0] < box[2] < COORD_SIZE and 0 <= box[1] < box[3] < COORD_SIZE):
        return f"box {list(box)} outside 0 <= x1 < x2 < {COORD_SIZE}, 0 <= y1 < y2 < {COORD_SIZE}"
    bad = [list(p) for p in points if not (0 <= p[0] < COORD_SIZE and 0 <= p[1] < COORD_SIZE)]
    return f"points {bad} outside [0, {COORD_SIZE})" if bad else None


def sam2_prompt(subset: str, pred: Prediction) -> SamPrompt:
    """The SAM2 prompt of a parsed segmentation answer (s4, ms3: ``box_points``; ref_avs: ``ref``), by the authors'
    rules on our tolerant parse (see the module docstring; ``authors_prompt`` reads the text as they do). Raises
    ``ValueError`` for another subset."""
    kind = get_task(subset).answer_kind
    if kind not in ("box_points", "ref"):
        raise ValueError(f"{subset}: SAM2 prompts are for s4, ms3 and ref_avs answers, not {kind!r}")
    if kind == "ref" and pred.exists is False:
        return SamPrompt()
    if not pred.ok:
        return SamPrompt(invalid=f"unparsable ({pred.error})")
    box, points = pred.box, pred.points[-3:]
    return _checked_prompt(kind, box, points)


def _checked_prompt(kind: str, box: Box | None, points: tuple[Point, ...]) -> SamPrompt:
    """The authors' validity rules for a prompt (``box_points``: a box needs points, points alone need 3; every
    coordinate in range), applied alike to our parse and to theirs."""
    if kind == "box_points":
        if box is not None and not points:
            return SamPrompt(invalid="a box without points")
        if box is None and len(points) < 3:
            return SamPrompt(invalid=f"{len(points)} point(s) and no box (3 points needed)")
    why = _out_of_range(box, points)
    return SamPrompt(invalid=why) if why else SamPrompt(box, points)


#: The authors' coordinate grammar, exactly (``extract_coordinates`` in seg/scripts/inference_3.py, line 39).
AUTHORS_COORDINATES = re.compile(r"\[(\d+),(\d+)(?:,(\d+),(\d+))?\]")
_TRUE, _FALSE, _END = "<answer>true</answer>", "<answer>false</answer>", "</s>"


def authors_prompt(subset: str, text: str) -> SamPrompt:
    """The SAM2 prompt the authors' evaluation takes from an answer's raw ``text`` (their ``extract_coordinates``,
    the main loops' point rules and ``validate_coordinates``; see the module docstring), or why it is invalid there.
    Raises ``ValueError`` for a subset other than s4, ms3 and ref_avs."""
    kind = get_task(subset).answer_kind
    if kind not in ("box_points", "ref"):
        raise ValueError(f"{subset}: SAM2 prompts are for s4, ms3 and ref_avs answers, not {kind!r}")
    head = text.split(_END, 1)[0]
    if kind == "ref" and (_FALSE in head or _TRUE not in head):
        return SamPrompt() if _FALSE in text else SamPrompt(invalid=f"no literal {_TRUE} (nor {_FALSE})")
    matches = AUTHORS_COORDINATES.findall(head)
    if not matches:
        if kind == "ref" and _FALSE in text:
            return SamPrompt()
        return SamPrompt(invalid="no coordinate in the authors' grammar [x,y] / [x1,y1,x2,y2] (integers, no spaces)")
    boxes = [tuple(int(v) for v in m) for m in matches if m[2]]
    box, points = (boxes[0] if boxes else None), tuple((int(m[0]), int(m[1])) for m in matches if not m[2])[-3:]
    return _checked_prompt(kind, box, points)


def mask_prompt(subset: str, text: str) -> SamPrompt:
    """The prompt an answer's mask is made from: ``authors_prompt`` where their grammar reads it, else ours
    (``sam2_prompt`` of the tolerant parse); invalid only when neither reads it."""
    theirs = authors_prompt(subset, text)
    return theirs if theirs.invalid is None else sam2_prompt(subset, parse(subset, text))


def prompt_mask(segmenter: Sam2Segmenter, frame: np.ndarray, prompt: SamPrompt) -> np.ndarray:
    """The predicted mask ``[H, W]`` of ``frame`` for ``prompt``: SAM2's, or empty for an absent or invalid answer."""
    h, w = frame.shape[:2]
    if prompt.invalid or prompt.empty:
        return np.zeros((h, w), bool)
    to_frame = lambda xy: _rescale_xy(np.asarray(xy, np.float64), (COORD_SIZE,) * 2, (w, h))  # noqa: E731
    box = None if prompt.box is None else to_frame(prompt.box).tolist()
    return segmenter.segment(frame, box=box, points=[to_frame(p).tolist() for p in prompt.points])
