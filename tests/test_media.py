"""Tests for omniola.media: every loader's happy path and every bad input, on media generated here."""

from __future__ import annotations

import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
from PIL import Image, ImageDraw, ImageFile

from omniola import media
from omniola.errors import InputError, MediaError
from omniola.media import MediaTruncatedWarning, VideoClip, load_audio, load_image, load_video

# The test video: VIDEO_FRAMES frames at VIDEO_FPS, each a flat colour whose red value encodes its index.
VIDEO_FPS = 8
VIDEO_FRAMES = 20  # 2.5 s
VIDEO_SIZE = (64, 48)  # width, height
RED_STEP = 12  # frame k has red = k * RED_STEP


# --------------------------------------------------------------------------------------------------
# Media writers
# --------------------------------------------------------------------------------------------------


def _sine(seconds: float, rate: int, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    """A float32 sine wave of shape [T]."""
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _dominant_frequency(samples: np.ndarray, rate: int) -> float:
    """The frequency (Hz) of the largest FFT bin."""
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(samples.shape[0], 1.0 / rate)[np.argmax(spectrum)])


def _write_video(path: Path, *, with_audio: bool, audio_rate: int = 44100) -> Path:
    """Write an H.264 (+ AAC stereo 440 Hz) MP4 whose frame k is flat red = k * RED_STEP."""
    width, height = VIDEO_SIZE
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=VIDEO_FPS)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.codec_context.gop_size = 4  # several keyframes, so seeking has somewhere to land
        video.options = {"preset": "ultrafast"}
        if with_audio:
            audio = container.add_stream("aac", rate=audio_rate)
            audio.layout = "stereo"
        for k in range(VIDEO_FRAMES):
            rgb = np.zeros((height, width, 3), np.uint8)
            rgb[..., 0] = k * RED_STEP
            rgb[..., 1] = 100
            for packet in video.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if with_audio:
            tone = _sine(VIDEO_FRAMES / VIDEO_FPS, audio_rate)
            _encode_audio(container, audio, np.stack([tone, tone]), audio_rate)
    return path


def _encode_audio(
    container: av.container.OutputContainer, stream: av.AudioStream, planar: np.ndarray, rate: int
) -> None:
    """Encode float32 planar samples [channels, T] into ``stream`` (PyAV adapts format and frame size)."""
    for start in range(0, planar.shape[1], 1024):
        chunk = np.ascontiguousarray(planar[:, start : start + 1024])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
        frame.sample_rate, frame.pts = rate, start
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def _write_mp3(path: Path, planar: np.ndarray, rate: int) -> Path:
    """Write stereo MP3 with PyAV's encoder; skips the calling test if it is unavailable."""
    try:
        av.codec.Codec("libmp3lame", "w")
    except Exception:
        pytest.skip("PyAV has no MP3 encoder (libmp3lame)")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libmp3lame", rate=rate)
        stream.layout = "stereo"
        _encode_audio(container, stream, planar, rate)
    return path


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def clip_mp4(media_dir: Path) -> Path:
    return _write_video(media_dir / "clip.mp4", with_audio=True)


@pytest.fixture(scope="module")
def silent_mp4(media_dir: Path) -> Path:
    return _write_video(media_dir / "silent.mp4", with_audio=False)


def _frame_index(frame: np.ndarray) -> int:
    """Recover k from a decoded frame of the test video."""
    return int(round(float(frame[..., 0].mean()) / RED_STEP))


def _nearest_frame_times(num_frames: int, span: float) -> np.ndarray:
    """The documented rule, computed independently: segment centres -> nearest frame (earlier on ties)."""
    times = np.arange(VIDEO_FRAMES) / VIDEO_FPS
    times = times[times < span]
    targets = (np.arange(num_frames) + 0.5) * span / num_frames
    return np.array([times[np.argmin(np.abs(times - t))] for t in targets])


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def test_load_image_png_rgba_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "rgba.png"
    picture = Image.new("RGBA", (40, 30), (255, 255, 255, 0))
    ImageDraw.Draw(picture).ellipse((5, 5, 25, 25), fill=(255, 0, 0, 255))
    picture.save(path)

    image = load_image(path)

    assert image.mode == "RGB" and image.size == (40, 30)
    assert image.getpixel((15, 15)) == (255, 0, 0)


def test_load_image_grayscale_jpeg_from_str_path(tmp_path: Path) -> None:
    path = tmp_path / "gray.jpg"
    Image.new("L", (32, 16), 128).save(path, quality=95)

    image = load_image(str(path))

    assert image.mode == "RGB" and image.size == (32, 16)
    assert all(abs(channel - 128) <= 2 for channel in image.getpixel((3, 3)))


def test_load_image_pil_input_is_converted() -> None:
    palette = Image.new("P", (8, 8), 0)
    image = load_image(palette)
    assert image.mode == "RGB" and image.size == (8, 8)


@pytest.mark.parametrize(
    ("array", "expected_pixel"),
    [
        (np.full((6, 4, 3), 200, np.uint8), (200, 200, 200)),
        (np.full((6, 4, 3), 0.5, np.float32), (128, 128, 128)),
        (np.full((6, 4), 10, np.uint8), (10, 10, 10)),
        (np.full((6, 4, 1), 1.0, np.float64), (255, 255, 255)),
        (np.full((6, 4, 4), 30, np.uint8), (30, 30, 30)),
    ],
    ids=["hwc-uint8", "hwc-float", "hw-gray", "hw1-float", "rgba-uint8"],
)
def test_load_image_from_array(array: np.ndarray, expected_pixel: tuple[int, int, int]) -> None:
    image = load_image(array)
    assert image.mode == "RGB" and image.size == (4, 6)
    assert image.getpixel((0, 0)) == expected_pixel


def test_load_image_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match=r"nope\.png.*does not exist"):
        load_image(tmp_path / "nope.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_load_image_truncated_file(tmp_path: Path, fmt: str, monkeypatch) -> None:
    path = tmp_path / f"cut.{fmt.lower()}"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(MediaError, match=r"cut\..*(truncated|corrupt)") as info:
        load_image(path)
    assert info.value.__cause__ is not None  # Pillow's error is kept as the cause
    # also where a library made Pillow lenient process-wide (lmms-eval does at import)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(MediaError, match=r"cut\..*(truncated|corrupt)"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_load_image_garbage_and_empty_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(MediaError, match=r"garbage\.png.*not a recognised image"):
        load_image(garbage)

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match=r"empty\.png.*empty"):
        load_image(empty)


def test_load_image_zero_sized() -> None:
    with pytest.raises(MediaError, match="empty"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(MediaError, match="empty"):
        load_image(np.zeros((0, 4, 3), np.uint8))


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.full((4, 4, 3), 2.0, np.float32), r"\[0, 1\]"),
        (np.full((4, 4, 3), np.nan, np.float32), r"\[0, 1\]"),
        (np.zeros((4, 4, 3), np.int64), "dtype"),
        (np.zeros((4, 4, 2), np.uint8), "shape"),
        (np.zeros((2, 4, 4, 3), np.uint8), "shape"),
    ],
)
def test_load_image_bad_arrays(array: np.ndarray, message: str) -> None:
    with pytest.raises(MediaError, match=message):
        load_image(array)


def test_load_image_bad_type() -> None:
    with pytest.raises(InputError, match="int"):
        load_image(42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "source_rate", "subtype"),
    [(".wav", 44100, "PCM_16"), (".flac", 8000, "PCM_16"), (".ogg", 44100, "VORBIS")],
)
def test_load_audio_files_are_resampled_to_mono(
    tmp_path: Path, suffix: str, source_rate: int, subtype: str
) -> None:
    path = tmp_path / f"tone{suffix}"
    left = _sine(1.0, source_rate, amplitude=0.6)
    soundfile.write(path, np.stack([left, np.zeros_like(left)], axis=1), source_rate, subtype=subtype)

    samples = load_audio(path)

    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(samples.shape[0] - 16000) <= 200  # 1 s at 16 kHz (OGG pads a little)
    assert _dominant_frequency(samples, 16000) == pytest.approx(440, abs=2)
    # The two channels are averaged: a 0.6 sine on the left and silence on the right give 0.3.
    assert np.abs(samples).max() == pytest.approx(0.3, abs=0.03)


def test_load_audio_other_sampling_rate(tmp_path: Path) -> None:
    path = tmp_path / "tone.wav"
    soundfile.write(path, _sine(0.5, 16000), 16000)
    samples = load_audio(path, sampling_rate=22050)
    assert samples.shape == (11025,) and samples.dtype == np.float32


def test_load_audio_mp3_via_pyav(tmp_path: Path) -> None:
    tone = _sine(1.0, 44100)
    path = _write_mp3(tmp_path / "tone.mp3", np.stack([tone, tone]), 44100)

    samples = load_audio(path)

    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(samples.shape[0] - 16000) < 0.1 * 16000  # MP3 adds encoder delay/padding
    assert _dominant_frequency(samples, 16000) == pytest.approx(440, abs=2)


def test_load_audio_from_video_sound_track(clip_mp4: Path) -> None:
    samples = load_audio(clip_mp4)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(samples.shape[0] - 2.5 * 16000) < 0.05 * 16000
    assert _dominant_frequency(samples, 16000) == pytest.approx(440, abs=2)


def test_load_audio_tuple_and_array_inputs() -> None:
    stereo = np.stack([np.full(800, 16384, np.int16), np.full(800, 8192, np.int16)], axis=1)
    samples = load_audio((stereo, 8000))  # int16 scaled by 1/32768: channels 0.5 and 0.25 -> mean 0.375
    assert samples.dtype == np.float32 and samples.shape == (1600,)  # resampled 8 kHz -> 16 kHz
    assert np.median(samples) == pytest.approx(0.375, abs=1e-3)

    mono = np.linspace(-1, 1, 100)
    np.testing.assert_allclose(load_audio(mono), mono.astype(np.float32))  # already at sampling_rate


def test_load_audio_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match=r"missing\.wav.*does not exist"):
        load_audio(tmp_path / "missing.wav")


@pytest.mark.parametrize("name", ["garbage.wav", "garbage.mp3", "garbage.flac"])
def test_load_audio_garbage_bytes(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(MediaError, match=rf"{name.replace('.', '[.]')}.*(could not|no audio)") as info:
        load_audio(path)
    assert info.value.__cause__ is not None or "no audio" in str(info.value)


def test_load_audio_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(MediaError, match=r"empty\.wav.*empty"):
        load_audio(path)


def test_load_audio_zero_length(tmp_path: Path) -> None:
    path = tmp_path / "silence.wav"
    soundfile.write(path, np.zeros((0, 2), np.float32), 16000)
    with pytest.raises(MediaError, match=r"silence\.wav.*zero-length"):
        load_audio(path)
    with pytest.raises(MediaError, match="zero-length"):
        load_audio(np.zeros(0, np.float32))
    with pytest.raises(MediaError, match="zero-length"):
        load_audio((np.zeros((0, 2), np.float32), 44100))


def test_load_audio_video_without_audio_stream(silent_mp4: Path) -> None:
    with pytest.raises(MediaError, match=r"silent\.mp4.*no audio stream"):
        load_audio(silent_mp4)


def test_load_audio_bad_arrays_and_arguments() -> None:
    with pytest.raises(MediaError, match="NaN"):
        load_audio(np.array([0.0, np.nan], np.float32))
    with pytest.raises(MediaError, match=r"samples\.T"):
        load_audio((np.zeros((2, 48000), np.float32), 48000))  # [channels, T] by mistake
    with pytest.raises(InputError, match="sampling_rate"):
        load_audio(np.zeros(10, np.float32), sampling_rate=0)
    with pytest.raises(InputError, match="sample rate"):
        load_audio((np.zeros(10, np.float32), -8000))
    with pytest.raises(InputError, match="max_seconds"):
        load_audio(np.zeros(10, np.float32), max_seconds=-1)
    with pytest.raises(InputError, match="list"):
        load_audio([0.0, 0.1])  # type: ignore[arg-type]


def test_load_audio_truncates_long_file_with_warning(tmp_path: Path) -> None:
    path = tmp_path / "long.wav"
    soundfile.write(path, _sine(3.0, 44100), 44100)

    with pytest.warns(MediaTruncatedWarning, match=r"long\.wav.*3\.00 s.*max_seconds=1") as record:
        samples = load_audio(path, max_seconds=1.0)

    assert samples.shape == (16000,)
    assert record[0].filename == __file__  # the warning points at the caller


def test_load_audio_truncates_pyav_and_arrays_with_warning(clip_mp4: Path) -> None:
    with pytest.warns(MediaTruncatedWarning, match=r"clip\.mp4.*max_seconds=0\.5"):
        samples = load_audio(clip_mp4, max_seconds=0.5)
    assert samples.shape == (8000,)

    with pytest.warns(MediaTruncatedWarning, match=r"2\.00 s.*max_seconds=1"):
        samples = load_audio((np.zeros(16000, np.float32), 8000), max_seconds=1)
    assert samples.shape == (16000,)


def test_load_audio_within_limit_does_not_warn(tmp_path: Path) -> None:
    path = tmp_path / "short.wav"
    soundfile.write(path, _sine(0.5, 16000), 16000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_audio(path, max_seconds=1.0).shape == (8000,)


# --------------------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------------------


def test_load_video_samples_uniformly(clip_mp4: Path) -> None:
    clip = load_video(clip_mp4, num_frames=8)

    assert isinstance(clip, VideoClip)
    assert clip.frames.dtype == np.uint8 and clip.frames.shape == (8, 48, 64, 3)
    assert clip.timestamps.dtype == np.float64 and clip.timestamps.shape == (8,)
    assert clip.duration == pytest.approx(2.5)
    np.testing.assert_allclose(clip.timestamps, _nearest_frame_times(8, 2.5))
    # Each returned frame is the one its timestamp says.
    expected_indices = np.round(clip.timestamps * VIDEO_FPS).astype(int).tolist()
    assert [_frame_index(frame) for frame in clip.frames] == expected_indices

    assert clip.audio is not None and clip.audio.dtype == np.float32 and clip.audio.ndim == 1
    assert abs(clip.audio.shape[0] - 2.5 * 16000) < 0.05 * 16000
    assert _dominant_frequency(clip.audio, 16000) == pytest.approx(440, abs=2)


def test_load_video_fewer_frames_than_requested_returns_all(clip_mp4: Path) -> None:
    clip = load_video(clip_mp4, num_frames=64, with_audio=False)
    assert clip.frames.shape == (VIDEO_FRAMES, 48, 64, 3)
    np.testing.assert_allclose(clip.timestamps, np.arange(VIDEO_FRAMES) / VIDEO_FPS)
    assert [_frame_index(frame) for frame in clip.frames] == list(range(VIDEO_FRAMES))
    assert clip.audio is None


def test_load_video_seeking_matches_sequential_pass(clip_mp4: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sequential = load_video(clip_mp4, num_frames=6, with_audio=False)
    monkeypatch.setattr(media, "_SEEK_MIN_SPACING_S", 0.1)  # force the seek path on this short clip

    def no_sequential_pass(*args: object, **kwargs: object) -> None:
        raise AssertionError("the seek path fell back to the sequential pass")

    monkeypatch.setattr(media, "_sample_sequentially", no_sequential_pass)
    seeking = load_video(clip_mp4, num_frames=6, with_audio=False)
    np.testing.assert_array_equal(seeking.timestamps, sequential.timestamps)
    np.testing.assert_array_equal(seeking.frames, sequential.frames)


def test_load_video_without_audio_stream(silent_mp4: Path) -> None:
    clip = load_video(silent_mp4, num_frames=4)
    assert clip.frames.shape == (4, 48, 64, 3)
    assert clip.audio is None


def test_load_video_truncates_long_video_with_warning(clip_mp4: Path) -> None:
    with pytest.warns(MediaTruncatedWarning, match=r"clip\.mp4.*2\.50 s.*max_seconds=1\.5") as record:
        clip = load_video(clip_mp4, num_frames=4, max_seconds=1.5)

    assert record[0].filename == __file__
    assert clip.duration == pytest.approx(1.5)
    np.testing.assert_allclose(clip.timestamps, _nearest_frame_times(4, 1.5))
    assert clip.timestamps.max() < 1.5
    assert clip.audio is not None and clip.audio.shape == (24000,)


def test_load_video_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match=r"gone\.mp4.*does not exist"):
        load_video(tmp_path / "gone.mp4")


def test_load_video_text_file_named_mp4(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("these are notes, not a video\n" * 20)
    with pytest.raises(MediaError, match=r"notes\.mp4.*could not be opened") as info:
        load_video(path)
    assert isinstance(info.value.__cause__, av.error.FFmpegError)


def test_load_video_without_frames(tmp_path: Path) -> None:
    # An MP4 whose index (moov, written first) is intact but whose sample data (mdat) is cut off.
    path = tmp_path / "hollow.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for k in range(6):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * k, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"mdat") + 4])

    with pytest.raises(MediaError, match=r"hollow\.mp4.*no decodable frames"):
        load_video(path)


def test_load_video_corrupt_data(clip_mp4: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.mp4"
    data = clip_mp4.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # moov is at the end: the file cannot even be opened
    with pytest.raises(MediaError, match=r"cut\.mp4"):
        load_video(path)


def test_load_video_audio_file_has_no_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "speech.wav"
    soundfile.write(path, _sine(0.5, 16000), 16000)
    with pytest.raises(MediaError, match=r"speech\.wav.*no video stream"):
        load_video(path)


def test_load_video_empty_file_and_bad_arguments(tmp_path: Path, clip_mp4: Path) -> None:
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(MediaError, match=r"empty\.mp4.*empty"):
        load_video(path)
    with pytest.raises(InputError, match="num_frames"):
        load_video(clip_mp4, num_frames=0)
    with pytest.raises(InputError, match="max_seconds"):
        load_video(clip_mp4, max_seconds=0)
