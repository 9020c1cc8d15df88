"""Reading and writing the media of AV-UIE v2: video frames and audio through PyAV, images through Pillow, wav files
through soundfile. Every reader raises ``MediaError`` naming the file when it cannot deliver."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import soundfile
from av.video.reformatter import VideoReformatter
from PIL import Image

from crabplus.sample import AUDIO_SAMPLE_RATE

Size = int | tuple[int, int] | None


class MediaError(RuntimeError):
    """A media file is missing, unreadable, or lacks the stream asked for."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _hw(size: Size) -> tuple[int, int] | None:
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else size
    if h <= 0 or w <= 0:
        raise ValueError(f"frame size must be positive, got {size!r}")
    return h, w


def _open(path: str | Path) -> av.container.InputContainer:
    if not Path(path).is_file():
        raise MediaError(path, "no such file")
    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(path, f"cannot open ({exc})") from exc


def sample_indices(total: int, num: int) -> np.ndarray:
    """``num`` frame indices spread evenly over ``total`` frames, first and last included (repeats when short)."""
    if total <= 0 or num <= 0:
        raise ValueError(f"need positive frame counts, got total={total}, num={num}")
    return np.round(np.linspace(0, total - 1, num)).astype(int)


def read_frames(path: str | Path, num_frames: int, size: Size = None) -> np.ndarray:
    """``num_frames`` RGB frames evenly spaced over the video, uint8 ``[F, H, W, 3]``, resized to ``size`` if given."""
    hw = _hw(size)
    kwargs = {"format": "rgb24"} if hw is None else {"format": "rgb24", "height": hw[0], "width": hw[1]}
    reformatter = VideoReformatter()  # one scaler for all frames: building one per frame costs milliseconds
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError(path, "no video stream")
        stream = container.streams.video[0]
        try:
            # Decoding every frame keeps the count exact (stream.frames is 0 or wrong for some containers);
            # AV-UIE clips are short, so this stays cheap, and only the kept frames are converted.
            frames = list(container.decode(stream))
            if not frames:
                raise MediaError(path, "video stream holds no frames")
            keep = sample_indices(len(frames), num_frames)
            return np.stack([reformatter.reformat(frames[i], **kwargs).to_ndarray() for i in keep])
        except av.FFmpegError as exc:
            raise MediaError(path, f"cannot decode video ({exc})") from exc


def read_audio(
    path: str | Path, sample_rate: int = AUDIO_SAMPLE_RATE, start: float | None = None, end: float | None = None
) -> np.ndarray:
    """Mono float32 audio resampled to ``sample_rate``, cut to ``[start, end)`` seconds if given.

    Works on audio files and on the audio track of videos. The result is trimmed to the stream's duration, since AAC
    padding adds samples at the end.
    """
    if start is not None and end is not None and end < start:
        raise ValueError(f"audio window ends ({end}) before it starts ({start})")
    with _open(path) as container:
        if not container.streams.audio:
            raise MediaError(path, "no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks = []
        try:
            for frame in container.decode(stream):
                chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
            chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
        except av.FFmpegError as exc:
            raise MediaError(path, f"cannot decode audio ({exc})") from exc
        duration = _duration(container, stream)
    audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if duration is not None:
        audio = audio[: round(duration * sample_rate)]
    lo = 0 if start is None else max(0, round(start * sample_rate))
    hi = len(audio) if end is None else round(end * sample_rate)
    return audio[lo:hi]


def _duration(container: av.container.InputContainer, stream: av.audio.stream.AudioStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def read_image(path: str | Path, size: Size = None) -> np.ndarray:
    """An RGB image as uint8 ``[H, W, 3]``, resized to ``size`` (bicubic) if given."""
    if not Path(path).is_file():
        raise MediaError(path, "no such file")
    hw = _hw(size)
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if hw is not None and image.size != (hw[1], hw[0]):
                image = image.resize((hw[1], hw[0]), Image.Resampling.BICUBIC)
            return np.asarray(image, dtype=np.uint8).copy()
    except OSError as exc:
        raise MediaError(path, f"cannot read image ({exc})") from exc


def read_mask(path: str | Path, size: Size = None) -> np.ndarray:
    """A binary mask (any non-zero pixel is foreground) as bool ``[H, W]``, resized with nearest neighbour."""
    if not Path(path).is_file():
        raise MediaError(path, "no such file")
    hw = _hw(size)
    try:
        with Image.open(path) as image:
            image = image.convert("L")
            if hw is not None and image.size != (hw[1], hw[0]):
                image = image.resize((hw[1], hw[0]), Image.Resampling.NEAREST)
            return np.asarray(image) > 0
    except OSError as exc:
        raise MediaError(path, f"cannot read mask ({exc})") from exc


# ---------------------------------------------------------------------------------------------------------- writers


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"h264 needs even frame sizes, got {frames.shape[1]}x{frames.shape[2]}")
    return frames


def _check_audio(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono [N], got shape {audio.shape}")
    return np.clip(audio, -1.0, 1.0)


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: int = 10,
    audio: np.ndarray | None = None,
    sample_rate: int = AUDIO_SAMPLE_RATE,
) -> None:
    """Write uint8 ``[F, H, W, 3]`` frames as an h264 mp4, with ``audio`` (mono float) as an aac track if given."""
    frames = _check_frames(frames)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=Fraction(fps))
        video.height, video.width = frames.shape[1:3]
        video.pix_fmt = "yuv420p"
        video.options = {"crf": "18", "preset": "veryfast"}
        sound = None
        if audio is not None:
            samples = _check_audio(audio)
            sound = container.add_stream("aac", rate=sample_rate)
            sound.layout = "mono"
        for frame in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode(None))
        if sound is not None:
            chunk = 1024  # aac frame size
            for i in range(0, len(samples), chunk):
                block = samples[None, i : i + chunk]
                out = av.AudioFrame.from_ndarray(np.ascontiguousarray(block), format="flt", layout="mono")
                out.sample_rate = sample_rate
                out.pts = i
                container.mux(sound.encode(out))
            container.mux(sound.encode(None))


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int = AUDIO_SAMPLE_RATE) -> None:
    """Write mono float audio as 16-bit PCM wav."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), _check_audio(audio), sample_rate, subtype="PCM_16")


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write a uint8 ``[H, W, 3]`` image or a bool/uint8 ``[H, W]`` mask; the format follows the suffix."""
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"image must be uint8 [H, W, 3] or a [H, W] mask, got {image.dtype} {image.shape}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 95} if Path(path).suffix.lower() in (".jpg", ".jpeg") else {}
    Image.fromarray(image).save(path, **options)
