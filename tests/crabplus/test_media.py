"""Media I/O: frames evenly spaced and resized, audio resampled to 16 kHz mono and trimmed, clear errors."""

import numpy as np
import pytest
import soundfile
from crabplus.data.media import (
    MediaError,
    read_audio,
    read_frames,
    read_image,
    read_mask,
    sample_indices,
    write_image,
    write_video,
    write_wav,
)


def _numbered_frames(n: int, size: int = 32) -> np.ndarray:
    """Frame i is uniformly grey at level 10 * i, so decoded frames tell which source frame they are."""
    return np.repeat((np.arange(n, dtype=np.uint8) * 10)[:, None, None, None], size * size * 3).reshape(
        n, size, size, 3
    )


def _sine(freq: float, seconds: float, rate: int) -> np.ndarray:
    return (0.4 * np.sin(2 * np.pi * freq * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


def _peak_hz(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio))
    return float(np.fft.rfftfreq(len(audio), 1 / rate)[spectrum.argmax()])


def test_sample_indices_even_and_inclusive():
    assert sample_indices(20, 4).tolist() == [0, 6, 13, 19]
    assert sample_indices(3, 5).tolist() == [0, 0, 1, 2, 2]
    with pytest.raises(ValueError, match="positive"):
        sample_indices(0, 4)


def test_frames_evenly_spaced_and_resized(tmp_path):
    path = tmp_path / "v.mp4"
    write_video(path, _numbered_frames(20), fps=10)
    frames = read_frames(path, 4)
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    levels = frames.reshape(4, -1).mean(1) / 10
    np.testing.assert_allclose(levels, [0, 6, 13, 19], atol=0.5)
    assert read_frames(path, 10, 48).shape == (10, 48, 48, 3)
    assert read_frames(path, 2, (16, 24)).shape == (2, 16, 24, 3)


def test_video_with_aac_audio_is_trimmed_to_its_duration(tmp_path):
    path = tmp_path / "av.mp4"
    write_video(path, _numbered_frames(10), fps=10, audio=_sine(440, 1.0, 16000))
    audio = read_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == 16000  # AAC padding removed
    assert abs(_peak_hz(audio, 16000) - 440) < 5
    assert read_frames(path, 3).shape[0] == 3


def test_wav_resampled_to_16k_mono_and_windowed(tmp_path):
    path = tmp_path / "a.wav"
    stereo = np.stack([_sine(1000, 0.5, 44100)] * 2, axis=1)
    soundfile.write(path, stereo, 44100)
    audio = read_audio(path)
    assert abs(len(audio) - 8000) <= 1
    assert abs(_peak_hz(audio, 16000) - 1000) < 5
    assert abs(len(read_audio(path, start=0.1, end=0.3)) - 3200) <= 1
    assert abs(len(read_audio(path, sample_rate=8000)) - 4000) <= 1
    with pytest.raises(ValueError, match="ends"):
        read_audio(path, start=0.3, end=0.1)


def test_write_wav_round_trip(tmp_path):
    wave = _sine(300, 0.25, 16000)
    write_wav(tmp_path / "w.wav", wave)
    np.testing.assert_allclose(read_audio(tmp_path / "w.wav"), wave, atol=1e-3)


def test_images_and_masks(tmp_path):
    image = np.zeros((20, 30, 3), np.uint8)
    image[:, :15] = (255, 0, 0)
    write_image(tmp_path / "i.png", image)
    np.testing.assert_array_equal(read_image(tmp_path / "i.png"), image)
    assert read_image(tmp_path / "i.png", 64).shape == (64, 64, 3)
    mask = np.zeros((20, 30), bool)
    mask[5:10, 5:10] = True
    write_image(tmp_path / "m.png", mask)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), mask)
    assert read_mask(tmp_path / "m.png", (40, 60)).sum() == 100


def test_errors_name_the_file(tmp_path):
    garbage = tmp_path / "bad.mp4"
    garbage.write_bytes(b"not a video" * 50)
    for reader in (lambda p: read_frames(p, 4), read_audio, read_image):
        with pytest.raises(MediaError, match="no such file") as info:
            reader(tmp_path / "missing.bin")
        assert info.value.path.endswith("missing.bin")
        with pytest.raises(MediaError, match=r"bad\.mp4"):
            reader(garbage)
    silent = tmp_path / "silent.mp4"
    write_video(silent, _numbered_frames(4), fps=10)
    with pytest.raises(MediaError, match="no audio stream"):
        read_audio(silent)
    write_wav(tmp_path / "a.wav", _sine(200, 0.1, 16000))
    with pytest.raises(MediaError, match="no video stream"):
        read_frames(tmp_path / "a.wav", 2)


def test_writers_reject_bad_arrays(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 7, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="mono"):
        write_wav(tmp_path / "x.wav", np.zeros((10, 2)))
    with pytest.raises(ValueError, match="image must be"):
        write_image(tmp_path / "x.png", np.zeros((4, 4), np.float32))
