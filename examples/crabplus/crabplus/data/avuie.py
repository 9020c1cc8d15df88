"""A map-style dataset over the released AV-UIE v2 layout, with subset selection, mixing ratios and a load report.

Layout: ``<root>/<subset>/train.json|test.json``; video subsets keep media under ``video/`` and ``audio/``, image
subsets (s4, ms3, ref_avs, arig) give paths relative to the subset folder. Each record becomes a ``Sample`` with the
registry's instruction, the record's target text, and its media decoded lazily in ``__getitem__``: audio cut to the
authors' per-task window (``crabplus.data.windows``), videos timed at the authors' 1 fps (``meta["fps"]``).

Bad data never stops a pass and is never silent. At index build, a record with a missing field (the frame index of ms3,
ref_avs and s4 test records included, as the authors' loader reads it; only s4 training always hears part 0), a missing
media file or (with ``check_media="open"``, the default) a media file that does not open is reported (file, index,
reason) and left out. A file that still fails to decode later makes ``__getitem__`` log a warning, record the problem
and return ``None``; ``collate_samples`` drops those, and iterating the dataset skips them and logs the report at the
end. AVVP test records, which hold no events, take their references from the LLP evaluation files
(``crabplus.data.llp``; ``avvp_labels`` or ``<root>/avvp/``); without them each is reported with what is missing.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch.utils.data
from PIL import Image

from crabplus.data.llp import find_llp_dir, read_llp_labels
from crabplus.data.media import MediaError, read_audio, read_frames, read_image
from crabplus.data.windows import task_audio
from crabplus.interface import Prediction, format_target, parse
from crabplus.sample import VIDEO_FPS, Sample
from crabplus.tasks import SUBSETS, TaskSpec, get_task

log = logging.getLogger(__name__)

#: Names the authors' test records use for fields that train records call otherwise.
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "image_path": ("visual_path",),
    "description": ("object",),
    "idx": ("frame_idx",),
}
CHECK_MEDIA = ("open", "exists", "none")


@dataclass(frozen=True)
class Problem:
    """One record (or file) left out: where, and why. ``index`` is the record's position, None for a whole file;
    ``line`` is set for JSON syntax errors."""

    file: str
    index: int | None
    reason: str
    line: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            where = f"line {self.line}"
        else:
            where = "whole file" if self.index is None else f"record {self.index}"
        return f"{self.file} [{where}]: {self.reason}"


@dataclass
class LoadReport:
    """What a load (and later reads) kept and left out, per subset."""

    loaded: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    read_problems: list[Problem] = field(default_factory=list)
    unparsed_targets: dict[str, int] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return len(self.problems) + len(self.read_problems)

    def summary(self) -> str:
        kept = ", ".join(f"{s} {n}" for s, n in self.loaded.items()) or "nothing"
        lines = [f"AV-UIE load: kept {sum(self.loaded.values())} records ({kept}); skipped {self.skipped}"]
        lines += [f"  skipped at load: {p}" for p in self.problems]
        lines += [f"  skipped at read: {p}" for p in self.read_problems]
        lines += [f"  {s}: {n} targets the interface cannot parse" for s, n in self.unparsed_targets.items() if n]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Entry:
    subset: str
    file: str
    index: int
    record: dict[str, Any]
    instruction: str
    target: str
    media: tuple[tuple[str, str], ...]  # (modality, path)
    reference: Prediction
    frame_index: int | None  # the audio part heard (segmentation subsets), None elsewhere


class _Skip(Exception):
    """A record that cannot be used; the message is the reason reported."""


def read_records(path: str | Path) -> tuple[list[tuple[int, Any]], list[Problem]]:
    """The records of a JSON array file (or JSON lines) with their positions, and the problems met.

    A file that is not valid JSON as a whole is read line by line (the layout ``synth`` writes and JSON lines), so
    one broken record costs only itself.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        return [], [Problem(str(path), None, f"cannot read ({exc})")]
    try:
        data = json.loads(text)
        if isinstance(data, list):
            return list(enumerate(data)), []
        return [], [Problem(str(path), None, f"top level is {type(data).__name__}, not a list of records")]
    except json.JSONDecodeError:
        pass
    records, problems = [], []
    for line_no, line in enumerate(text.splitlines(), start=1):
        line = line.strip().rstrip(",")
        if line in ("", "[", "]"):
            continue
        try:
            records.append((len(records) + len(problems), json.loads(line)))
        except json.JSONDecodeError as exc:
            problems.append(Problem(str(path), len(records) + len(problems), f"invalid JSON ({exc.msg})", line_no))
    return records, problems


def get_field(record: Mapping[str, Any], name: str) -> Any:
    """``record[name]``, or its test-split alias; raises ``KeyError`` naming the field."""
    for key in (name, *FIELD_ALIASES.get(name, ())):
        if key in record:
            return record[key]
    raise KeyError(name)


def reference_from_fields(spec: TaskSpec, record: Mapping[str, Any]) -> Prediction | None:
    """The structured answer held by a record's label fields (test records lack the target text), if it has them."""
    try:
        if spec.answer_kind == "match":
            return Prediction(choice=int(record[spec.label_fields[0]]))
        if spec.name == "ave":
            return Prediction(events=((str(record["event"]), record["start_time"], record["end_time"]),))
        if spec.answer_kind == "ref" and "split" in record:
            return Prediction(exists=record["split"] != "test_n")
        if spec.answer_kind == "grounding" and "top_left" in record:
            return Prediction(label=str(record["a_obj"]), box=(*record["top_left"], *record["bottom_right"]))
        if spec.label_fields and spec.answer_kind in ("answer", "box_points", "grounding"):
            return Prediction(label=str(record[spec.label_fields[0]]))
    except (KeyError, TypeError, ValueError):
        return None
    return None


def _probe(modality: str, path: Path) -> None:
    try:
        if modality == "image":
            with Image.open(path) as image:
                image.verify()
            return
        with av.open(str(path)) as container:
            streams = container.streams.video if modality == "video" else container.streams.audio
            if not streams:
                raise _Skip(f"{path} has no {modality} stream")
    except (OSError, av.FFmpegError, ValueError) as exc:
        raise _Skip(f"unreadable {modality} file {path} ({exc})") from exc


class AVUIEDataset(torch.utils.data.Dataset):
    """AV-UIE v2 records as ``Sample``s.

    ``subsets``: names, or ``{name: ratio}`` where a ratio r keeps ``floor(r)`` full copies of the subset plus a
    random ``frac(r)`` share of it (drawn from ``seed``, so the mix is deterministic). ``frame_size`` resizes frames
    and images (None keeps them). ``check_media``: ``"open"`` opens every media file at index build, ``"exists"``
    only checks that it exists (faster on a large dataset), ``"none"`` neither.
    """

    def __init__(
        self,
        root: str | Path,
        subsets: Sequence[str] | Mapping[str, float] | None = None,
        split: str = "train",
        seed: int = 0,
        frame_size: int | None = 224,
        check_media: str = "open",
        avvp_labels: str | Path | None = None,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if check_media not in CHECK_MEDIA:
            raise ValueError(f"check_media must be one of {CHECK_MEDIA}, got {check_media!r}")
        self.root, self.split, self.frame_size, self.check_media = Path(root), split, frame_size, check_media
        self.avvp_labels = avvp_labels
        self._llp: dict[str, Prediction] | None = None
        if not self.root.is_dir():
            raise FileNotFoundError(f"AV-UIE root {self.root} is not a directory")
        ratios = dict(subsets) if isinstance(subsets, Mapping) else dict.fromkeys(subsets or SUBSETS, 1.0)
        self.report = LoadReport()
        self.entries: list[_Entry] = []
        for subset, ratio in ratios.items():
            spec = get_task(subset)
            if not (isinstance(ratio, int | float) and math.isfinite(ratio) and ratio >= 0):
                raise ValueError(f"mixing ratio of {subset!r} must be a finite number >= 0, got {ratio!r}")
            entries = self._load_subset(spec)
            self.entries += _mix(entries, ratio, np.random.default_rng([seed, zlib.crc32(subset.encode())]))
            self.report.loaded[subset] = len(entries)
        (log.warning if self.report.skipped else log.info)(self.report.summary())

    def _load_subset(self, spec: TaskSpec) -> list[_Entry]:
        path = self.root / spec.name / f"{self.split}.json"
        if self.split == "test" and not spec.has_test and not path.is_file():  # a generated one is read
            log.info("%s ships no test.json; nothing to load for it", spec.name)
            return []
        if not path.is_file():
            self.report.problems.append(Problem(str(path), None, "no such file"))
            return []
        records, problems = read_records(path)
        self.report.problems += problems
        entries = []
        for index, record in records:
            try:
                entries.append(self._entry(spec, path, index, record))
            except _Skip as exc:
                self.report.problems.append(Problem(str(path), index, str(exc)))
        self.report.unparsed_targets[spec.name] = sum(1 for e in entries if not e.reference.ok)
        return entries

    def _entry(self, spec: TaskSpec, path: Path, index: int, record: Any) -> _Entry:
        if not isinstance(record, dict):
            raise _Skip(f"record is a {type(record).__name__}, not an object")
        missing = [name for name in spec.required_fields if not _has(record, name)]
        if missing:
            raise _Skip(f"missing field(s) {', '.join(map(repr, missing))}")
        frame_index = _frame_index(spec, self.split, record)
        target = record.get(spec.target_field)
        fields_ref = reference_from_fields(spec, record)
        if target is None and self.split == "test" and spec.name == "avvp":
            fields_ref = self._llp_reference(record)
        if target is None and self.split == "test" and fields_ref is not None:
            target = format_target(spec.name, fields_ref) if _formattable(spec, fields_ref) else ""
        if target is None:
            raise _Skip(f"missing target field {spec.target_field!r}")
        if not isinstance(target, str):
            raise _Skip(f"target field {spec.target_field!r} is a {type(target).__name__}, not text")
        media = []
        for (name, folder), modality in zip(spec.media, spec.modalities):
            value = get_field(record, name)
            if not isinstance(value, str) or not value:
                raise _Skip(f"field {name!r} is not a file path: {value!r}")
            file = self.root / spec.name / folder / value
            if self.check_media != "none" and not file.is_file():
                raise _Skip(f"missing {modality} file {file} (field {name!r})")
            if self.check_media == "open":
                _probe(modality, file)
            media.append((modality, str(file)))
        parsed = parse(spec.name, target) if target else Prediction(error="no target text")
        reference = parsed if parsed.ok or fields_ref is None else fields_ref
        resolved = {**record, **{name: get_field(record, name) for name in FIELD_ALIASES if _has(record, name)}}
        try:
            instruction = spec.format_instruction(resolved)
        except (KeyError, ValueError, IndexError) as exc:
            raise _Skip(f"cannot build the instruction ({exc})") from exc
        return _Entry(spec.name, str(path), index, record, instruction, target, tuple(media), reference, frame_index)

    def _llp_reference(self, record: Mapping[str, Any]) -> Prediction:
        """An AVVP test record's events from the LLP evaluation files (``crabplus.data.llp``); a malformed file is an
        error, a missing one (or filename) leaves the record out with the reason."""
        if self._llp is None:
            where, missing = find_llp_dir(self.root, self.avvp_labels)
            if where is None:
                raise _Skip(missing)
            self._llp = read_llp_labels(where)
        name = record.get("filename")
        if name not in self._llp:
            raise _Skip(f"filename {name!r} is in neither LLP evaluation file (AVVP_eval_audio/visual.csv)")
        return self._llp[name]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> Sample | None:
        """The sample at ``i``, or None (logged and recorded in ``report.read_problems``) if its media fail."""
        try:
            return self.sample(i)
        except (MediaError, ValueError, OSError) as exc:
            entry = self.entries[i]
            problem = Problem(entry.file, entry.index, f"unreadable media ({exc})")
            self.report.read_problems.append(problem)
            log.warning("skipping %s", problem)
            return None

    def __iter__(self) -> Iterator[Sample]:
        """The readable samples in order; logs the report when the pass ends."""
        for i in range(len(self)):
            sample = self[i]
            if sample is not None:
                yield sample
        (log.warning if self.report.skipped else log.info)(self.report.summary())

    def sample(self, i: int) -> Sample:
        """The sample at ``i``; raises ``MediaError`` naming the file that fails."""
        entry = self.entries[i]
        spec = get_task(entry.subset)
        frame_index = entry.frame_index
        frames, audio = [], []
        for modality, path in entry.media:
            if modality == "video":
                frames.append(read_frames(path, spec.num_frames, self.frame_size))
            elif modality == "image":
                frames.append(read_image(path, self.frame_size)[None])
            else:
                audio.append(task_audio(read_audio(path), spec.name, frame_index))
        # Two videos (a2v) or two audios (v2a) are concatenated in time, as the authors feed them.
        waveform = np.concatenate(audio) if audio else None
        meta = {
            "subset": entry.subset,
            "split": self.split,
            "file": entry.file,
            "index": entry.index,
            "ids": {k: entry.record[k] for k in (*spec.id_fields, spec.split_field) if k in entry.record},
            "media": [path for _, path in entry.media],
            "reference": entry.reference,
            "frame_index": frame_index,
            "mask_path": mask_path(entry.subset, entry.media[0][1], entry.record),
        }
        if any(modality == "video" for modality, _ in entry.media):
            meta["fps"] = VIDEO_FPS  # the authors' processor times every clip at 1 fps, whatever its frame rate
        return Sample(entry.subset, entry.instruction, entry.target, np.concatenate(frames), waveform, meta)


def _has(record: Mapping[str, Any], name: str) -> bool:
    try:
        get_field(record, name)
    except KeyError:
        return False
    return True


def _frame_index(spec: TaskSpec, split: str, record: Mapping[str, Any]) -> int | None:
    """The audio part a segmentation record hears, from its frame index field as the authors' loader reads it
    (``sample['frame_idx']``, ref_avs training ``sample['idx']``: a record without it is bad, never part 0); s4
    training always hears part 0 (their ``add_s4_samples`` passes ``'idx': 0``). None for the other subsets."""
    if not spec.audio_segments or spec.frame_index_field is None:
        return None
    if spec.name == "s4" and split == "train":
        return 0
    name = spec.frame_index_field
    if not _has(record, name):
        aliases = "".join(f" (or {alias!r})" for alias in FIELD_ALIASES.get(name, ()))
        raise _Skip(f"missing field {name!r}{aliases}: the frame index that picks the audio part heard")
    value = get_field(record, name)
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).strip().isdigit():
        raise _Skip(f"field {name!r} is not a frame index (a whole number): {value!r}")
    if not int(value) < spec.audio_segments:
        raise _Skip(f"field {name!r} = {value!r} is outside the audio parts 0..{spec.audio_segments - 1}")
    return int(value)


def _formattable(spec: TaskSpec, ref: Prediction) -> bool:
    try:
        format_target(spec.name, ref)
    except ValueError:
        return False
    return True


def _mix(entries: list[_Entry], ratio: float, rng: np.random.Generator) -> list[_Entry]:
    whole, frac = int(ratio), ratio - int(ratio)
    extra = rng.choice(len(entries), size=round(frac * len(entries)), replace=False) if entries else []
    return entries * whole + [entries[j] for j in sorted(extra)]


def mask_path(subset: str, image_path: str, record: Mapping[str, Any]) -> str | None:
    """The ground-truth mask of an AVS frame by the authors' path rules, if that file exists."""
    if subset in ("s4", "ms3"):
        path = image_path.replace("/frames/", "/labels_rgb/").replace(".jpg", ".png")
    elif subset == "ref_avs" and "fid" in record:
        fid = record["fid"]
        path = (
            image_path.replace("/media/", "/gt_mask/").replace(".jpg", ".png").replace("/frames/", f"/fid_{fid}/0000")
        )
    else:
        return None
    return path if path != image_path and Path(path).is_file() else None


def collate_samples(batch: Sequence[Sample | None]) -> list[Sample]:
    """A DataLoader ``collate_fn`` that drops the samples ``__getitem__`` could not read."""
    return [sample for sample in batch if sample is not None]
