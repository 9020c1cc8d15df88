"""Synthetic audio-visual scenes: coloured shapes that sound as tones, and faces that sound as emotional voices.

A clip is ``NUM_SEGMENTS`` segments of ``segment_seconds``; every label of the synthetic dataset follows from what is
drawn and played here (see ``crabplus.data.synth``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from crabplus.sample import AUDIO_SAMPLE_RATE
from crabplus.tasks import COORD_SIZE, NUM_SEGMENTS, pixel_index


@dataclass(frozen=True)
class Source:
    """A sounding object: how it looks (colour, shape) and how it sounds (a tone of one pitch)."""

    name: str
    colour_name: str
    colour: tuple[int, int, int]
    shape: str
    freq: float
    pitch: str


SOURCES: tuple[Source, ...] = (
    Source("violin", "red", (230, 40, 40), "circle", 440.0, "middle"),
    Source("drum", "green", (40, 200, 60), "square", 110.0, "low"),
    Source("flute", "blue", (50, 90, 230), "triangle", 880.0, "very high"),
    Source("bell", "yellow", (240, 210, 40), "diamond", 660.0, "high"),
)

EMOTIONS: tuple[str, ...] = ("happy", "sad", "angry", "neutral")

# What each emotion looks and sounds like, for the reasoning sentences.
EMOTION_CUES = {
    "happy": ("a smiling face", "a rising, lively voice"),
    "sad": ("a frowning face", "a falling, quiet voice"),
    "angry": ("a red face with a flat mouth", "a loud, harsh voice"),
    "neutral": ("a face with a straight mouth", "a flat, steady voice"),
}


@dataclass(frozen=True)
class SynthConfig:
    """Media settings of the synthetic dataset: square frames of ``size`` pixels, ``fps`` frames per second."""

    size: int = 64
    fps: int = 10
    segment_seconds: float = 0.2
    sample_rate: int = AUDIO_SAMPLE_RATE

    def __post_init__(self) -> None:
        if self.size < 16 or self.size % 2:
            raise ValueError(f"size must be an even number >= 16, got {self.size}")
        if self.fps <= 0 or self.segment_seconds <= 0:
            raise ValueError(f"fps and segment_seconds must be positive, got {self.fps}, {self.segment_seconds}")

    @property
    def seconds(self) -> float:
        return NUM_SEGMENTS * self.segment_seconds

    @property
    def num_frames(self) -> int:
        return max(1, round(self.seconds * self.fps))


@dataclass
class Obj:
    """A shape in a clip: centre at t=0 in pixels, velocity in pixels per second, per-segment visibility and sound."""

    source: Source
    x: float
    y: float
    radius: int
    vx: float = 0.0
    vy: float = 0.0
    visible: np.ndarray = field(default_factory=lambda: np.ones(NUM_SEGMENTS, bool))
    audible: np.ndarray = field(default_factory=lambda: np.ones(NUM_SEGMENTS, bool))


def segments(start: int, end: int) -> np.ndarray:
    """A per-segment mask that is on over ``[start, end)``."""
    mask = np.zeros(NUM_SEGMENTS, bool)
    mask[start:end] = True
    return mask


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Bool ``[size, size]`` mask of a shape centred at ``(cx, cy)`` with half-extent ``r``."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":  # apex up
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def _background(config: SynthConfig, rng: np.random.Generator, frames: int) -> np.ndarray:
    noise = rng.integers(0, 12, size=(1, config.size, config.size, 1), dtype=np.uint8)
    return np.broadcast_to(noise + 24, (frames, config.size, config.size, 3)).copy()


def _centre(obj: Obj, t: float) -> tuple[float, float]:
    return obj.x + obj.vx * t, obj.y + obj.vy * t


def render_video(objs: list[Obj], config: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[T, S, S, 3]`` frames of the shapes, each drawn while its segment is visible."""
    frames = _background(config, rng, config.num_frames)
    for i in range(config.num_frames):
        t = i / config.fps
        seg = min(int(t / config.segment_seconds), NUM_SEGMENTS - 1)
        for obj in objs:
            if obj.visible[seg]:
                frames[i][shape_mask(obj.source.shape, *_centre(obj, t), obj.radius, config.size)] = obj.source.colour
    return frames


def render_image(objs: list[Obj], config: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """One uint8 ``[S, S, 3]`` frame of the shapes at their t=0 places."""
    frame = _background(config, rng, 1)[0]
    for obj in objs:
        frame[object_mask(obj, config)] = obj.source.colour
    return frame


def object_mask(obj: Obj, config: SynthConfig) -> np.ndarray:
    return shape_mask(obj.source.shape, obj.x, obj.y, obj.radius, config.size)


def tone(freq: float, n: int, sample_rate: int, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(n) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def render_audio(objs: list[Obj], config: SynthConfig, rng: np.random.Generator, seconds: float | None = None):
    """float32 mono audio: each object's tone over its audible segments, plus faint noise."""
    total = round((seconds or config.seconds) * config.sample_rate)
    audio = (rng.standard_normal(total) * 0.003).astype(np.float32)
    per_segment = round(config.segment_seconds * config.sample_rate)
    for obj in objs:
        wave = tone(obj.source.freq, total, config.sample_rate)
        gate = np.repeat(obj.audible.astype(np.float32), per_segment)[:total]
        audio[: len(gate)] += wave[: len(gate)] * gate
    return audio


def render_face(emotion: str, config: SynthConfig, rng: np.random.Generator, frames: int) -> np.ndarray:
    """uint8 ``[T, S, S, 3]``: a face whose mouth (and tint) shows ``emotion``."""
    size = config.size
    video = _background(config, rng, frames)
    c, r = size / 2, size * 0.35
    skin = (200, 60, 50) if emotion == "angry" else (225, 185, 150)
    face = shape_mask("circle", c, c, r, size)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    dx = (x - c) / (r * 0.6)
    bend = {"happy": 1.0, "sad": -1.0}.get(emotion, 0.0)
    mouth_y = c + r * 0.45 - bend * r * 0.25 * (1 - dx**2)
    mouth = (np.abs(dx) <= 1) & (np.abs(y - mouth_y) <= max(1.0, size / 40))
    eyes = shape_mask("circle", c - r * 0.4, c - r * 0.3, r * 0.12, size) | shape_mask(
        "circle", c + r * 0.4, c - r * 0.3, r * 0.12, size
    )
    video[:, face] = skin
    video[:, mouth | eyes] = (40, 20, 20)
    return video


def voice(emotion: str, config: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """float32 audio whose pitch contour and loudness carry ``emotion``."""
    n = round(config.seconds * config.sample_rate)
    t = np.arange(n) / config.sample_rate
    contour = {"happy": (300.0, 600.0), "sad": (500.0, 250.0), "angry": (350.0, 350.0), "neutral": (300.0, 300.0)}
    f0, f1 = contour[emotion]
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * config.seconds))
    wave = np.sign(np.sin(phase)) * 0.5 if emotion == "angry" else np.sin(phase) * (0.12 if emotion == "sad" else 0.3)
    return (wave + rng.standard_normal(n) * 0.003).astype(np.float32)


def box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``[x1, y1, x2, y2]`` of a mask's pixels as inclusive ``COORD_SIZE`` pixel indices (``crabplus.tasks``): the box
    of the mask resized to ``COORD_SIZE`` by nearest-neighbour sampling through pixel centres (``pixel_index``). For
    a mask of at most ``COORD_SIZE`` pixels a side, the corners map back (``pixel_index``, or ``rescale_index`` then
    ``floor(+0.5)``) exactly onto the mask's own corner pixels; a larger mask is subsampled, as at scoring."""
    rows, cols = (pixel_index(np.arange(COORD_SIZE), COORD_SIZE, n) for n in mask.shape)  # the pixel each samples
    ys, xs = np.nonzero(mask[np.ix_(rows, cols)])
    if len(xs) == 0:
        raise ValueError("empty mask has no box (at COORD_SIZE)")
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def points_of(obj: Obj, config: SynthConfig) -> tuple[tuple[int, int], ...]:
    """Three points on the object (its pixels nearest its centre and a third of the radius left and right of it), in
    ``COORD_SIZE`` space: each holds the centre of that frame pixel (``pixel_index``), so it maps back onto it."""
    ys, xs = np.nonzero(object_mask(obj, config))
    if len(xs) == 0:
        raise ValueError(f"{obj.source.name} at ({obj.x}, {obj.y}) covers no pixel of the {config.size}-pixel frame")
    nearest = [int(np.argmin((xs - obj.x - d) ** 2 + (ys - obj.y) ** 2)) for d in (0, -obj.radius / 3, obj.radius / 3)]
    to_coord = lambda v: int(pixel_index(v, config.size, COORD_SIZE))  # noqa: E731
    return tuple((to_coord(xs[k]), to_coord(ys[k])) for k in nearest)


def describe(source: Source) -> str:
    """ "a red circle" - how a source looks."""
    return f"a {source.colour_name} {source.shape}"


def hear(source: Source) -> str:
    """ "a middle tone (440 Hz)" - how a source sounds."""
    return f"a {source.pitch} tone ({source.freq:g} Hz)"
