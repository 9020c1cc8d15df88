"""The registry of AV-UIE v2: 7 task families, 19 subsets, and what each subset reads, asks, answers and is scored with.

Instructions, preambles and frame counts follow the authors' loader (``dataset/qwen2_5_omni/omni_dataset.py`` in
GeWu-Lab/Crab_Plus).

Coordinate convention (one for the synthetic generator, the parser, the scorer and the SAM2 prompts): boxes
``[x1,y1,x2,y2]`` and points ``[x,y]`` are integer *inclusive pixel indices* of the model's ``COORD_SIZE`` x
``COORD_SIZE`` input image, ``0 <= x, y < COORD_SIZE`` (the authors' ``validate_coordinates`` in
``seg/scripts/inference_3.py`` refuses ``x2 >= 224``); a box covers pixels ``x1..x2`` and ``y1..y2``. Pixel ``i`` spans
``[i, i + 1)`` with its centre at ``i + 0.5``, as SAM2's prompt encoder reads its input ("shift to center of pixel").
A coordinate moves between images of different sizes through pixel centres (``rescale_index``, float indices; for
whole pixels ``pixel_index``, the pixel holding the centre, exact in integers: ``ceil(a * 224 / n - 0.5)`` is the first
``COORD_SIZE`` pixel of frame pixel ``a``); a mask's box is the box of the mask resized to ``COORD_SIZE`` with
nearest-neighbour sampling through pixel centres, as the authors score masks at 224 x 224. For frames of at most
``COORD_SIZE`` pixels a side, a box or point so made maps back exactly onto the frame pixels it came from.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Side of the square image the model sees; box and point coordinates in targets live in this space.
COORD_SIZE = 224


def rescale_index(values: Any, src_size: int, dst_size: int) -> Any:
    """Pixel indices (int or float, any array shape) of a ``src_size`` axis -> float indices of a ``dst_size`` axis
    with the same pixel centres: ``(i + 0.5) * dst / src - 0.5``. Exactly invertible; ``floor(result + 0.5)`` is the
    destination pixel holding the source pixel's centre."""
    if src_size <= 0 or dst_size <= 0:
        raise ValueError(f"image sizes must be positive, got {src_size} -> {dst_size}")
    return (values + 0.5) * (dst_size / src_size) - 0.5


def pixel_index(index: Any, src_size: int, dst_size: int) -> Any:
    """Integer pixel indices (int or integer array) of a ``src_size`` axis -> the ``dst_size`` pixel holding each one's
    centre: ``floor((2 i + 1) * dst / (2 * src))``, i.e. ``floor(rescale_index(i, src, dst) + 0.5)`` computed exactly
    in integers (no rounding error at ties). With ``src = COORD_SIZE`` it is the nearest-neighbour resize's source
    pixel: a ``COORD_SIZE`` answer maps back onto a frame pixel; with ``dst = COORD_SIZE`` it places a frame pixel."""
    if src_size <= 0 or dst_size <= 0:
        raise ValueError(f"image sizes must be positive, got {src_size} -> {dst_size}")
    return (2 * index + 1) * dst_size // (2 * src_size)


#: The options of a cross-modal matching answer (a2v: which of the two videos, v2a: which of the two audios).
MATCH_CHOICES = (1, 2)

#: Points an s4, ms3 or Ref-AVS answer gives on the object besides its box: the instructions ask for "three pixel
#: points", and the authors' evaluation prompts SAM2 with at most the last three (``seg/scripts/inference_3.py``).
NUM_POINTS = 3

#: Temporal tasks (AVE, AVVP) describe a clip as this many unit segments ("seconds" in AVE and AVVP).
NUM_SEGMENTS = 10

FAMILIES: tuple[str, ...] = (
    "action_recognition",
    "emotion_recognition",
    "cross_modal_matching",
    "temporal_localization",
    "segmentation_grounding",
    "captioning",
    "question_answering",
)

#: How a subset's answer is structured; ``crabplus.interface`` formats and parses each kind.
ANSWER_KINDS: tuple[str, ...] = ("answer", "match", "events", "avvp", "caption", "box_points", "grounding", "ref")

SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory and "
    "visual inputs, as well as generating text and speech."
)

_AV = "This is a video and an audio:"
_IA = "This is an image and an audio:"
_ACTION = "Please identify the action taking place in the video."
_EMOTION = "Please judge the person's emotion at the moment."
_EVENTS = "Please describe the events and time range that occurred in the video."
_AVS = (
    "Please identify the category of the object producing the sound in the video frame. Then, provide the bounding "
    "box and three pixel points of the object that is making the sound within the frame."
)


@dataclass(frozen=True)
class TaskSpec:
    """One AV-UIE v2 subset.

    ``media`` maps a record field to the folder (under ``<root>/<subset>/``) its path is relative to, in the order the
    model sees the inputs; ``""`` means the subset folder itself (image subsets). ``instruction`` may hold
    ``{field}`` placeholders filled from the record. ``label_fields`` name the record fields that hold the structured
    answer (used to build references for ``test.json`` records, which may lack the target text). ``audio_segments``
    is set where the audio is cut into that many equal parts and the one at the record's frame index is kept.
    """

    name: str
    family: str
    answer_kind: str
    instruction: str
    preamble: str
    media: tuple[tuple[str, str], ...]
    target_field: str
    has_test: bool
    metrics: tuple[str, ...]
    num_frames: int = 10
    label_fields: tuple[str, ...] = ()
    id_fields: tuple[str, ...] = ()
    audio_segments: int | None = None
    frame_index_field: str | None = None
    split_field: str | None = None
    """The field naming a test record's evaluation split (Ref-AVS: ``test_s``, ``test_u``, ``test_n``)."""
    options_field: str | None = None
    """The field listing a record's answer options (multiple choice: the answer space of that question)."""

    @property
    def modalities(self) -> tuple[str, ...]:
        """The input kinds in order, e.g. ``("audio", "video", "video")`` for a2v."""
        return tuple(_MODALITY[folder or field] for field, folder in self.media)

    @property
    def prompt_media(self) -> tuple[str, ...]:
        """The media placeholders of the user turn in order, each ``"visual"`` or ``"audio"``.

        Several inputs of one kind share one placeholder, placed where the last of them stands: the authors' loader
        (``__getitem__`` of ``dataset/qwen2_5_omni/omni_dataset.py``) drops all but the last repeated placeholder of
        a2v (videos) and v2a (audios). So a2v is ``("audio", "visual")``, v2a ``("visual", "audio")``.
        """
        kinds = ["audio" if m == "audio" else "visual" for m in self.modalities]
        last = {kind: i for i, kind in enumerate(kinds)}
        return tuple(sorted(last, key=last.__getitem__))

    @property
    def uses_image(self) -> bool:
        return "image" in self.modalities

    @property
    def required_fields(self) -> tuple[str, ...]:
        """Fields every record must have (media paths and instruction placeholders; the target is checked apart)."""
        placeholders = tuple(_placeholders(self.instruction))
        return tuple(field for field, _ in self.media) + placeholders

    def format_instruction(self, record: Mapping[str, Any]) -> str:
        """The instruction for one record; raises ``KeyError`` naming a placeholder field the record lacks."""
        values = {}
        for key in _placeholders(self.instruction):
            if key not in record:
                raise KeyError(f"{self.name}: instruction needs field {key!r}, absent from the record")
            value = record[key]
            values[key] = value.lower() if key == "description" else value
        return self.instruction.format(**values)


_MODALITY = {"video": "video", "audio": "audio", "image_path": "image", "visual_path": "image", "audio_path": "audio"}


def _placeholders(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _av(name: str, family: str, kind: str, instruction: str, target: str, metrics: tuple[str, ...], **kw: Any):
    return TaskSpec(
        name=name,
        family=family,
        answer_kind=kind,
        instruction=instruction,
        preamble=kw.pop("preamble", _AV),
        media=kw.pop("media", (("video_path", "video"), ("audio_path", "audio"))),
        target_field=target,
        metrics=metrics,
        **kw,
    )


def _emotion(name: str, label_field: str, has_test: bool = True) -> TaskSpec:
    return _av(name, "emotion_recognition", "answer", _EMOTION, "label", ("accuracy",), num_frames=4,
               label_fields=(label_field,), has_test=has_test)  # fmt: skip


def _segmentation(name: str, instruction: str, kind: str, target: str, metrics: tuple[str, ...], **kw: Any):
    return TaskSpec(
        name=name,
        family="segmentation_grounding",
        answer_kind=kind,
        instruction=instruction,
        preamble=_IA,
        media=(("image_path", ""), ("audio_path", "")),
        target_field=target,
        has_test=True,
        metrics=metrics,
        num_frames=1,
        **kw,
    )


_SPECS: tuple[TaskSpec, ...] = (
    _av("a2v", "cross_modal_matching", "match",
        "Please listen to the audio and indicate which of the two videos matches what you hear.", "label",
        ("accuracy",), preamble="These are two videos and an audio:", has_test=True,
        media=(("audio_path", "audio"), ("video1_path", "video"), ("video2_path", "video")),
        label_fields=("correct_video",)),
    _av("v2a", "cross_modal_matching", "match",
        "Please view the video and indicate which of the two audio clips matches what you see.", "label",
        ("accuracy",), preamble="This is a video and two audio clips:", has_test=True,
        media=(("video_path", "video"), ("audio1_path", "audio"), ("audio2_path", "audio")),
        label_fields=("correct_audio",)),
    _av("ks", "action_recognition", "answer", _ACTION, "label", ("accuracy",), has_test=True, label_fields=("action",)),
    _av("ucf", "action_recognition", "answer", _ACTION, "new_label", ("accuracy",), has_test=True,
        label_fields=("label",)),
    _emotion("meld", "Emotion"),
    _emotion("mer24", "discrete", has_test=False),
    _emotion("cremad", "emotion"),
    _emotion("mafw", "emotion"),
    _emotion("dfew", "emotion"),
    _av("avqa", "question_answering", "answer", "Please answer this question: {question}", "label", ("accuracy",),
        has_test=True, label_fields=("answer",), id_fields=("video_id", "question_id", "type")),
    _av("avqa_thu", "question_answering", "answer",
        "Please answer the question based on the options: {question_text}, options:{multi_choice}", "label",
        ("accuracy",), has_test=True, label_fields=("answer",), options_field="multi_choice",
        id_fields=("id", "video_id", "video_name", "question_type", "question_relation")),
    _av("ave", "temporal_localization", "events", _EVENTS, "label_content", ("ave_accuracy", "tiou"), has_test=True,
        label_fields=("event", "start_time", "end_time"), id_fields=("vid",)),
    _av("unav", "temporal_localization", "events", _EVENTS, "label_content", ("tiou",), has_test=False,
        id_fields=("vid",)),
    _av("avvp", "temporal_localization", "avvp",
        "Please determine the events that occur based on the visual and audio information in the video, as well as "
        "the start and end times of these events.", "label_content",
        ("avvp_segment", "avvp_event"), has_test=True, id_fields=("vid", "filename")),
    _av("avcap", "captioning", "caption", "Please describe this video and audio.", "label_content",
        ("bleu4", "cider", "rouge_l"), has_test=False, id_fields=("video_id",)),
    _segmentation("s4", _AVS, "box_points", "label_content", ("mask_j", "mask_f", "box_iou", "label_accuracy"),
                  label_fields=("a_obj",), id_fields=("vid", "uid"), audio_segments=5,
                  frame_index_field="frame_idx"),
    _segmentation("ms3", _AVS, "box_points", "label_content", ("mask_j", "mask_f", "box_iou", "label_accuracy"),
                  label_fields=("a_obj",), id_fields=("vid", "uid"), audio_segments=5,
                  frame_index_field="frame_idx"),
    _segmentation("ref_avs",
                  "Please analyze the video frame and audio to find the object described as <des>{description}</des>. "
                  'Answer with "true" or "false" whether the object exists. If it exists, respond with a sentence '
                  "identifying the object's name, its bounding box, and three pixel points; if not, state that the "
                  "object is absent.", "ref", "output", ("exist_accuracy", "mask_j", "mask_f", "s_metric", "box_iou"),
                  id_fields=("vid", "fid", "uid"), audio_segments=10, frame_index_field="idx", split_field="split"),
    _segmentation("arig",
                  "Please recognize the category of object that makes the sound and then output its bounding box.",
                  "grounding", "label_content", ("box_iou", "label_accuracy"), label_fields=("a_obj",)),
)  # fmt: skip

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in _SPECS}
SUBSETS: tuple[str, ...] = tuple(TASKS)
EMOTION_SUBSETS: tuple[str, ...] = tuple(n for n, s in TASKS.items() if s.family == "emotion_recognition")


def get_task(subset: str) -> TaskSpec:
    """The spec of ``subset``; raises ``KeyError`` listing the known subsets."""
    try:
        return TASKS[subset]
    except KeyError:
        raise KeyError(f"unknown AV-UIE v2 subset {subset!r}; known: {', '.join(SUBSETS)}") from None


def subsets_of(family: str) -> tuple[str, ...]:
    """The subsets of one task family; raises ``KeyError`` for an unknown family."""
    if family not in FAMILIES:
        raise KeyError(f"unknown task family {family!r}; known: {', '.join(FAMILIES)}")
    return tuple(name for name, spec in TASKS.items() if spec.family == family)
