"""Write a small AV-UIE v2-format dataset whose labels follow from the generated content.

Layout and record fields are the released ones (``<out>/<subset>/train.json|test.json``, media under ``video/`` and
``audio/``, image subsets relative to the subset folder). Targets are written with ``crabplus.interface.format_target``
after a reasoning sentence that states the evidence (what is seen and heard).

    python -m crabplus.data.synth --out DIR --train 8 --test 4 --seed 0
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from crabplus.data import scene
from crabplus.data.media import write_image, write_video, write_wav
from crabplus.data.scene import EMOTION_CUES, EMOTIONS, SOURCES, Obj, Source, SynthConfig, describe, hear
from crabplus.interface import Prediction, format_target
from crabplus.tasks import NUM_SEGMENTS, SUBSETS, get_task

if TYPE_CHECKING:
    from crabplus.config import RunConfig

# Subsets the release ships without a test split that get one here, so the demo scores every task family (captioning).
TEST_ONLY_HERE = ("avcap",)
UCF_ACTIONS = {"Moving Left": (-1, 0), "Moving Right": (1, 0), "Moving Up": (0, -1), "Moving Down": (0, 1)}


@dataclass
class _Ctx:
    """Where and how one (subset, split) writes: its folder, the media settings, and its own random stream."""

    root: Path
    subset: str
    split: str
    config: SynthConfig
    rng: np.random.Generator

    def vid(self, i: int) -> str:
        return f"{self.subset}_{self.split}_{i:04d}"

    def video(self, name: str, frames: np.ndarray) -> str:
        """Write ``video/<name>``; returns ``name`` (video paths are relative to ``video/``)."""
        write_video(self.root / "video" / name, frames, fps=self.config.fps)
        return name

    def audio(self, name: str, audio: np.ndarray) -> str:
        """Write ``audio/<name>``; returns ``name`` (audio paths of video subsets are relative to ``audio/``)."""
        self.file(f"audio/{name}", audio)
        return name

    def file(self, rel: str, data: np.ndarray) -> str:
        """Write an image, mask or wav at ``rel`` under the subset folder; returns ``rel``."""
        if rel.endswith(".wav"):
            write_wav(self.root / rel, data, self.config.sample_rate)
        else:
            write_image(self.root / rel, data)
        return rel

    def target(self, structured: Prediction, reasoning: str = "") -> str:
        return format_target(self.subset, structured, reasoning)

    def pick(self, k: int = 1) -> list[Source]:
        return [SOURCES[i] for i in self.rng.choice(len(SOURCES), size=k, replace=False)]

    def obj(self, source: Source, x: float | None = None, radius: int | None = None, **kw: Any) -> Obj:
        size = self.config.size
        r = radius or int(size * self.rng.uniform(0.1, 0.16))
        x = x if x is not None else float(self.rng.uniform(r + 1, size - r - 1))
        return Obj(source, x, float(self.rng.uniform(r + 1, size - r - 1)), r, **kw)

    def span(self, min_len: int = 2) -> tuple[int, int]:
        start = int(self.rng.integers(0, NUM_SEGMENTS - min_len + 1))
        return start, int(self.rng.integers(start + min_len, NUM_SEGMENTS + 1))


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _av_clip(ctx: _Ctx, objs: list[Obj], name: str) -> dict[str, str]:
    frames = scene.render_video(objs, ctx.config, ctx.rng)
    audio = scene.render_audio(objs, ctx.config, ctx.rng)
    return {"video_path": ctx.video(f"{name}.mp4", frames), "audio_path": ctx.audio(f"{name}.wav", audio)}


def _ks(ctx: _Ctx, i: int) -> dict[str, Any]:
    (src,) = ctx.pick()
    speed = ctx.config.size / ctx.config.seconds / 4
    rec = _av_clip(ctx, [ctx.obj(src, vy=float(ctx.rng.choice([-speed, speed])))], ctx.vid(i))
    action = f"playing {src.name}"
    why = f"The video shows {describe(src)} and the audio is {hear(src)}, which is how a {src.name} looks and sounds."
    return {**rec, "action": action, "label": ctx.target(Prediction(label=action), why)}


def _ucf(ctx: _Ctx, i: int) -> dict[str, Any]:
    (src,) = ctx.pick()
    name = list(UCF_ACTIONS)[int(ctx.rng.integers(len(UCF_ACTIONS)))]
    dx, dy = UCF_ACTIONS[name]
    size, r = ctx.config.size, int(ctx.config.size * 0.12)

    def start(d: int) -> float:  # centred across the motion, at the far edge along it
        return size / 2 if d == 0 else (r + 2 if d > 0 else size - r - 2)

    speed = (size - 2 * r - 4) / ctx.config.seconds
    obj = Obj(src, start(dx), start(dy), r, vx=dx * speed, vy=dy * speed)
    rec = _av_clip(ctx, [obj], ctx.vid(i))
    why = f"The {src.colour_name} {src.shape} travels {name.split()[1].lower()} across the frame."
    return {**rec, "label": name, "new_label": ctx.target(Prediction(label=name.lower()), why)}


def _emotion(field_name: str) -> Callable[[_Ctx, int], dict[str, Any]]:
    def make(ctx: _Ctx, i: int) -> dict[str, Any]:
        emotion = EMOTIONS[int(ctx.rng.integers(len(EMOTIONS)))]
        frames = scene.render_face(emotion, ctx.config, ctx.rng, ctx.config.num_frames)
        rec = {
            "video_path": ctx.video(f"{ctx.vid(i)}.mp4", frames),
            "audio_path": ctx.audio(f"{ctx.vid(i)}.wav", scene.voice(emotion, ctx.config, ctx.rng)),
        }
        look, sound = EMOTION_CUES[emotion]
        why = f"The person shows {look} and speaks with {sound}."
        return {**rec, field_name: emotion, "label": ctx.target(Prediction(label=emotion), why)}

    return make


def _a2v(ctx: _Ctx, i: int) -> dict[str, Any]:
    heard, other = ctx.pick(2)
    correct = int(ctx.rng.integers(1, 3))
    shown = (heard, other) if correct == 1 else (other, heard)
    vid = ctx.vid(i)
    rec = {"audio_path": ctx.audio(f"{vid}.wav", scene.render_audio([ctx.obj(heard)], ctx.config, ctx.rng))}
    for k, src in enumerate(shown, start=1):
        rec[f"video{k}_path"] = ctx.video(f"{vid}_{k}.mp4", scene.render_video([ctx.obj(src)], ctx.config, ctx.rng))
    why = (
        f"The audio is {hear(heard)}, the sound of a {heard.name}. The first video shows {describe(shown[0])} and the "
        f"second shows {describe(shown[1])}; the {heard.name} is in the {'first' if correct == 1 else 'second'} one."
    )
    return {
        **rec,
        "correct_video": correct,
        "audio_event": heard.name,
        "video1_event": shown[0].name,
        "video2_event": shown[1].name,
        "label": ctx.target(Prediction(choice=correct), why),
    }


def _v2a(ctx: _Ctx, i: int) -> dict[str, Any]:
    seen, other = ctx.pick(2)
    correct = int(ctx.rng.integers(1, 3))
    heard = (seen, other) if correct == 1 else (other, seen)
    vid = ctx.vid(i)
    rec = {"video_path": ctx.video(f"{vid}.mp4", scene.render_video([ctx.obj(seen)], ctx.config, ctx.rng))}
    for k, src in enumerate(heard, start=1):
        rec[f"audio{k}_path"] = ctx.audio(f"{vid}_{k}.wav", scene.render_audio([ctx.obj(src)], ctx.config, ctx.rng))
    why = (
        f"The video shows {describe(seen)}, a {seen.name}. The first audio is {hear(heard[0])} and the second is "
        f"{hear(heard[1])}; the {seen.name} sounds in the {'first' if correct == 1 else 'second'} one."
    )
    return {
        **rec,
        "correct_audio": correct,
        "video_event": seen.name,
        "audio1_event": heard[0].name,
        "audio2_event": heard[1].name,
        "label": ctx.target(Prediction(choice=correct), why),
    }


def _ave(ctx: _Ctx, i: int) -> dict[str, Any]:
    (src,) = ctx.pick()
    start, end = ctx.span()
    on = scene.segments(start, end)
    rec = _av_clip(ctx, [ctx.obj(src, visible=on, audible=on)], ctx.vid(i))
    why = f"{_cap(describe(src))} is visible and {hear(src)} is heard from second {start} to second {end}."
    target = ctx.target(Prediction(events=((src.name, start, end),)), why)
    return {**rec, "event": src.name, "vid": ctx.vid(i), "start_time": start, "end_time": end, "label_content": target}


def _unav(ctx: _Ctx, i: int) -> dict[str, Any]:
    srcs = ctx.pick(int(ctx.rng.integers(1, 3)))
    spans = [ctx.span() for _ in srcs]
    objs = [ctx.obj(s, visible=scene.segments(*sp), audible=scene.segments(*sp)) for s, sp in zip(srcs, spans)]
    rec = _av_clip(ctx, objs, ctx.vid(i))
    why = " ".join(f"The {s.name} is seen and heard from second {a} to second {b}." for s, (a, b) in zip(srcs, spans))
    events = tuple((s.name, a, b) for s, (a, b) in zip(srcs, spans))
    return {**rec, "vid": ctx.vid(i), "label_content": ctx.target(Prediction(events=events), why)}


def _avvp(ctx: _Ctx, i: int) -> dict[str, Any]:
    objs, audio_events, visual_events, why = [], [], [], []
    for src in ctx.pick(int(ctx.rng.integers(1, 3))):
        mode = ("both", "audio", "visual")[int(ctx.rng.integers(3))]
        a_span, v_span = ctx.span(), ctx.span()
        audible = scene.segments(*a_span) if mode != "visual" else scene.segments(0, 0)
        visible = scene.segments(*v_span) if mode != "audio" else scene.segments(0, 0)
        objs.append(ctx.obj(src, visible=visible, audible=audible))
        if mode != "visual":
            audio_events.append((src.name, *a_span))
            why.append(f"{_cap(hear(src))} sounds from second {a_span[0]} to {a_span[1]}.")
        if mode != "audio":
            visual_events.append((src.name, *v_span))
            why.append(f"{_cap(describe(src))} is visible from second {v_span[0]} to {v_span[1]}.")
    rec = _av_clip(ctx, objs, ctx.vid(i))
    target = ctx.target(Prediction(audio_events=tuple(audio_events), visual_events=tuple(visual_events)), " ".join(why))
    names = sorted({e[0] for e in audio_events + visual_events})
    return {**rec, "filename": ctx.vid(i), "vid": ctx.vid(i), "event": ",".join(names), "label_content": target}


def _pair(ctx: _Ctx) -> tuple[list[Source], list[Obj]]:
    """Two different sources side by side (left, right), both sounding throughout until the caller says otherwise."""
    srcs = ctx.pick(2)
    size, r = ctx.config.size, int(ctx.config.size * 0.13)
    return srcs, [ctx.obj(s, x=x, radius=r) for s, x in zip(srcs, (size * 0.27, size * 0.73))]


def _silent() -> np.ndarray:
    return scene.segments(0, 0)


def _avqa(ctx: _Ctx, i: int) -> dict[str, Any]:
    qtype = ("Counting", "Temporal", "Location")[i % 3]
    if qtype == "Temporal":
        s1, s2 = sorted(ctx.rng.choice(NUM_SEGMENTS - 2, size=2, replace=False).tolist())
        srcs, objs = _pair(ctx)
        early = int(ctx.rng.integers(2))  # which side starts first
        objs[early].audible = scene.segments(s1, NUM_SEGMENTS)
        objs[1 - early].audible = scene.segments(s2, NUM_SEGMENTS)
        first = srcs[early]
        question, answer = "Which instrument makes sounds first?", first.name
        why = f"The {first.name} ({hear(first)}) starts at second {s1}, before the other instrument at second {s2}."
    else:
        sounding = [True, True] if qtype == "Counting" and ctx.rng.random() < 0.5 else [True, False]
        if ctx.rng.random() < 0.5:
            sounding.reverse()
        srcs, objs = _pair(ctx)
        for obj, on in zip(objs, sounding):
            obj.audible = obj.audible if on else _silent()
        heard = [s.name for s, on in zip(srcs, sounding) if on]
        if qtype == "Counting":
            answer = {1: "one", 2: "two"}[len(heard)]
            question = "How many instruments are sounding in the video?"
            why = f"Two instruments are visible; only the tones of {' and '.join(heard)} are heard."
        else:
            answer = "left" if sounding[0] else "right"
            question = "Where is the sounding instrument?"
            why = f"The {heard[0]} is heard and it stands on the {answer} of the frame."
    rec = _av_clip(ctx, objs, ctx.vid(i))
    label = ctx.target(Prediction(label=answer), why)
    qtype_json = json.dumps(["Audio-Visual", qtype])
    meta = {"video_id": ctx.vid(i), "question_id": i, "type": qtype_json, "question": question, "answer": answer}
    return {**rec, **meta, "label": label}


def _avqa_thu(ctx: _Ctx, i: int) -> dict[str, Any]:
    srcs, objs = _pair(ctx)
    speaker = int(ctx.rng.integers(2))
    objs[1 - speaker].audible = _silent()
    heard = srcs[speaker]
    options = [s.name for s in SOURCES]
    ctx.rng.shuffle(options)
    rec = _av_clip(ctx, objs, ctx.vid(i))
    why = f"A {srcs[0].name} and a {srcs[1].name} are visible, but only {hear(heard)} is heard: the {heard.name}."
    return {
        **rec,
        "id": i,
        "video_name": f"{ctx.vid(i)}.mp4",
        "video_id": ctx.vid(i),
        "question_relation": "Both",
        "question_type": "Which",
        "question_text": "Which object is making the sound?",
        "multi_choice": options,
        "answer": heard.name,
        "label": ctx.target(Prediction(label=heard.name), why),
    }


def _avcap(ctx: _Ctx, i: int) -> dict[str, Any]:
    (src,) = ctx.pick()
    direction = ("left", "right")[int(ctx.rng.integers(2))]
    speed = ctx.config.size / ctx.config.seconds / 3 * (1 if direction == "right" else -1)
    rec = _av_clip(ctx, [ctx.obj(src, x=ctx.config.size / 2, vx=speed)], ctx.vid(i))
    caption = f"{_cap(describe(src))} moves to the {direction} while {hear(src)} plays."
    return {**rec, "video_id": ctx.vid(i), "label_content": ctx.target(Prediction(caption=caption))}


def _s4(ctx: _Ctx, i: int) -> dict[str, Any]:
    return _avs(ctx, i, multi=False)


def _ms3(ctx: _Ctx, i: int) -> dict[str, Any]:
    return _avs(ctx, i, multi=True)


def _avs(ctx: _Ctx, i: int, multi: bool) -> dict[str, Any]:
    """S4: one sounding shape and a silent one; MS3: two shapes taking turns, the frame index picks the turn."""
    _, objs = _pair(ctx)
    frame_idx = int(ctx.rng.integers(5)) if multi else 0
    turns = ctx.rng.integers(2, size=5) if multi else np.full(5, ctx.rng.integers(2))
    for k, obj in enumerate(objs):  # the loader cuts the audio in 5 parts: part j = segments 2j, 2j+1
        obj.audible = np.repeat(turns == k, 2)
    sounding = objs[int(turns[frame_idx])]
    vid = ctx.vid(i)
    image = ctx.file(f"frames/{vid}/{frame_idx}.jpg", scene.render_image(objs, ctx.config, ctx.rng))
    ctx.file(f"labels_rgb/{vid}/{frame_idx}.png", scene.object_mask(sounding, ctx.config))
    audio = ctx.file(f"audio/{vid}.wav", scene.render_audio(objs, ctx.config, ctx.rng))
    src = sounding.source
    why = f"At this moment the audio is {hear(src)}, and {describe(src)} - a {src.name} - is in the frame."
    box = scene.box_of(scene.object_mask(sounding, ctx.config))
    target = ctx.target(Prediction(label=src.name, box=box, points=scene.points_of(sounding, ctx.config)), why)
    return {"image_path": image, "audio_path": audio, "vid": vid, "uid": f"{vid}_{frame_idx}",
            "a_obj": src.name, "frame_idx": frame_idx, "label_content": target}  # fmt: skip


def _ref_avs(ctx: _Ctx, i: int) -> dict[str, Any]:
    srcs, objs = _pair(ctx)
    idx = int(ctx.rng.integers(NUM_SEGMENTS))
    speaker = int(ctx.rng.integers(2))
    objs[1 - speaker].audible = _silent()
    absent = next(s for s in SOURCES if s not in srcs)
    kind = ("sounding", "looks", "absent")[i % 3]
    if kind == "absent":
        description, target_obj = f"the {absent.colour_name} {absent.shape}", None
        why = f"The frame shows {describe(srcs[0])} and {describe(srcs[1])}; no {absent.colour_name} {absent.shape}."
    else:
        target_obj = objs[speaker] if kind == "sounding" else objs[int(ctx.rng.integers(2))]
        s = target_obj.source
        description = "the object making the sound" if kind == "sounding" else f"the {s.colour_name} {s.shape}"
        why = f"{_cap(hear(objs[speaker].source))} is heard; the described object is {describe(s)}."
    vid, fid = ctx.vid(i), 0
    image = ctx.file(f"media/{vid}/frames/{idx}.jpg", scene.render_image(objs, ctx.config, ctx.rng))
    mask = scene.object_mask(target_obj, ctx.config) if target_obj else np.zeros((ctx.config.size,) * 2, bool)
    ctx.file(f"gt_mask/{vid}/fid_{fid}/0000{idx}.png", mask)  # the authors' rule: frames/<i>.jpg -> 0000<i>.png
    audio = ctx.file(f"media/{vid}/audio.wav", scene.render_audio(objs, ctx.config, ctx.rng))
    if target_obj is None:
        structured = Prediction(exists=False)
    else:
        box = scene.box_of(scene.object_mask(target_obj, ctx.config))
        points = scene.points_of(target_obj, ctx.config)
        structured = Prediction(exists=True, label=target_obj.source.name, box=box, points=points)
    rec = {"vid": vid, "fid": fid, "uid": f"{vid}_{fid}", "idx": idx, "description": description,
           "output": ctx.target(structured, why), "image_path": image, "audio_path": audio}  # fmt: skip
    if ctx.split == "test":  # the authors' test records also name the split (null = test_n) and the object
        rec.update(split="test_n" if target_obj is None else "test_s", object=description)
    return rec


def _arig(ctx: _Ctx, i: int) -> dict[str, Any]:
    srcs, objs = _pair(ctx)
    speaker = int(ctx.rng.integers(2))
    objs[1 - speaker].audible = _silent()
    src, vid, idx = srcs[speaker], ctx.vid(i), int(ctx.rng.integers(5))
    image = ctx.file(f"frames/{vid}/{idx}.jpg", scene.render_image(objs, ctx.config, ctx.rng))
    audio = ctx.file(f"audio/{vid}.wav", scene.render_audio(objs, ctx.config, ctx.rng))
    box = scene.box_of(scene.object_mask(objs[speaker], ctx.config))
    why = f"The audio is {hear(src)}, the sound of a {src.name}, shown as {describe(src)}."
    rec = {"image_path": image, "audio_path": audio, "a_obj": src.name,
           "label_content": ctx.target(Prediction(label=src.name, box=box), why)}  # fmt: skip
    if ctx.split == "test":
        rec.update(top_left=list(box[:2]), bottom_right=list(box[2:]), frame_idx=idx)
    return rec


GENERATORS: dict[str, Callable[[_Ctx, int], dict[str, Any]]] = {
    "a2v": _a2v, "v2a": _v2a, "ks": _ks, "ucf": _ucf, "meld": _emotion("Emotion"), "mer24": _emotion("discrete"),
    "cremad": _emotion("emotion"), "mafw": _emotion("emotion"), "dfew": _emotion("emotion"), "avqa": _avqa,
    "avqa_thu": _avqa_thu, "ave": _ave, "unav": _unav, "avvp": _avvp, "avcap": _avcap, "s4": _s4, "ms3": _ms3,
    "ref_avs": _ref_avs, "arig": _arig,
}  # fmt: skip


def write_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """A JSON array with one record per line (valid JSON, and a broken line stays a local fault)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")


def generate(
    out: str | Path,
    train: int = 8,
    test: int = 4,
    seed: int = 0,
    subsets: Sequence[str] | None = None,
    config: SynthConfig | None = None,
) -> dict[str, dict[str, int]]:
    """Write the dataset under ``out``; returns ``{subset: {split: records}}``.

    Each (subset, split) draws from its own generator seeded by ``seed``, the subset name and the split, so a subset's
    data does not depend on which other subsets are generated. ``test`` is ignored for subsets without ``test.json``
    in the release, except those of ``TEST_ONLY_HERE``.
    """
    if train < 0 or test < 0:
        raise ValueError(f"train and test counts must be >= 0, got {train}, {test}")
    config = config or SynthConfig()
    counts: dict[str, dict[str, int]] = {}
    for subset in subsets or SUBSETS:
        spec = get_task(subset)
        counts[subset] = {}
        for split, n in (("train", train), ("test", test)):
            if split == "test" and not (spec.has_test or subset in TEST_ONLY_HERE):
                continue
            rng = np.random.default_rng([seed, zlib.crc32(subset.encode()), split == "test"])
            ctx = _Ctx(Path(out) / subset, subset, split, config, rng)
            write_records(ctx.root / f"{split}.json", [GENERATORS[subset](ctx, i) for i in range(n)])
            counts[subset][split] = n
    return counts


def synthesize(cfg: RunConfig, root: str | Path) -> Path:
    """Generate the synthetic dataset of ``cfg.data.synth`` under ``root`` (kept when already there with these
    settings) and point ``cfg.data.root`` at it."""
    s, root = cfg.data.synth, Path(root)
    marker = root / "synth.json"
    wanted = {"train": s.train, "test": s.test, "seed": s.seed, "size": s.size, "subsets": cfg.subsets()}
    if not marker.is_file() or json.loads(marker.read_text()) != wanted:
        generate(root, s.train, s.test, s.seed, cfg.subsets(), SynthConfig(size=s.size))
        marker.write_text(json.dumps(wanted))
    cfg.data.root = str(root)
    return root


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output root (subset folders go under it)")
    parser.add_argument("--train", type=int, default=8, help="train records per subset")
    parser.add_argument("--test", type=int, default=4, help="test records per subset that ships test.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels")
    parser.add_argument("--subsets", nargs="*", choices=SUBSETS, help="subsets to write (default: all 19)")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    counts = generate(args.out, args.train, args.test, args.seed, args.subsets, SynthConfig(size=args.size))
    total = sum(sum(c.values()) for c in counts.values())
    print(f"wrote {total} records in {len(counts)} subsets to {args.out} in {time.perf_counter() - began:.1f}s")


if __name__ == "__main__":
    main()
