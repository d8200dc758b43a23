"""Media I/O: decode images, audio and video into plain arrays.

Every loader takes a path (or an in-memory array) and returns arrays; nothing here knows about models or
tokens. A problem with the media itself (missing, unreadable, truncated, empty, no usable stream) raises
:class:`~omniola.errors.MediaError` with a message naming the file and the problem; the library's own
exception is kept as the cause (``raise ... from err``). A bad argument (``num_frames=0``, a negative
``max_seconds``, an unsupported input type) raises :class:`~omniola.errors.InputError`.

Decoding backends:

- images: Pillow, fully decoded on load so a truncated file fails here rather than later;
- audio: soundfile (libsndfile) for WAV/FLAC/OGG and similar, PyAV (FFmpeg) for everything else (MP3, the
  sound track of MP4/MKV/WebM, ...) and as a fallback when soundfile cannot read a file; resampling with
  soxr at high quality;
- video: PyAV.

Media longer than ``max_seconds`` is cut to its first ``max_seconds`` with a :class:`MediaTruncatedWarning`.

Every loader also takes :class:`MediaLimits`: bounds read from the file's header or container (pixels, aspect ratio,
sample rate, channels, duration, frame count) and checked *before* anything is decoded, so a small file that
claims a huge picture or hours of sound (a decompression bomb) raises :class:`~omniola.errors.MediaLimitError`
instead of filling memory. What is decoded afterwards is capped at the same bounds. Loaders accept the encoded
file's ``bytes`` too (what a server receives), named ``<image data>`` etc. in errors.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import soundfile
import soxr
from PIL import Image

from omniola.errors import InputError, MediaError, MediaLimitError

__all__ = [
    "MediaLimits",
    "MediaTruncatedWarning",
    "VideoClip",
    "load_audio",
    "load_image",
    "load_video",
]

PathLike = str | os.PathLike[str]
Source = PathLike | bytes  # a file, or an encoded file's bytes

# Suffixes tried with soundfile first; everything else goes straight to PyAV.
_SOUNDFILE_SUFFIXES = frozenset({".wav", ".wave", ".flac", ".ogg", ".oga", ".aif", ".aiff", ".au"})

# load_video seeks to each target time instead of decoding the whole window when targets are at least
# this many seconds apart: a seek costs one decode from the previous keyframe (typically 0.5-10 s of video),
# so below this spacing a single sequential pass is as cheap and never depends on the container's index.
_SEEK_MIN_SPACING_S = 5.0

# [T, channels] audio arrays with more channels than this are rejected as probably [channels, T].
_MAX_AUDIO_CHANNELS = 32

# Streams of a container whose probe skips decoding (see `_open_av`); further streams are probed as FFmpeg likes.
_PROBED_STREAMS = 64

# Audio files are read and downmixed in blocks of this many frames, so a many-channel file never sits in memory
# whole: what is kept is its mono copy.
_AUDIO_BLOCK_FRAMES = 1 << 16


@dataclass(frozen=True)
class MediaLimits:
    """Bounds on media, read from the header or container and checked before any decoding.

    Media past a bound raise :class:`~omniola.errors.MediaLimitError` naming the bound and the value; ``None``
    switches a bound off. The defaults are the library's, generous enough for a user's own files;
    ``omniola serve`` passes tighter ones (see ``omniola.server.settings.ServerSettings``).

    Attributes:
        max_image_pixels: Largest image, width * height (its RGB copy takes 3 bytes a pixel: 8192^2 is 192 MiB).
        max_aspect_ratio: Longest over shortest side of an image or video frame (Qwen2-VL refuses beyond 200:1;
            an 8 x 2,097,152 strip would otherwise become thousands of tokens).
        max_audio_seconds: Longest audio, a video's sound track included. Unlike a loader's ``max_seconds``,
            which cuts, this refuses.
        min_audio_rate / max_audio_rate: Sample rates accepted in Hz. Resampling multiplies the length by
            16000 / rate, so a 40 KB WAV at 1 Hz would become a gigabyte at 16 kHz.
        max_audio_channels: Most channels in an audio stream.
        max_video_seconds: Longest video stream.
        max_video_pixels: Largest video frame, width * height.
        max_video_stream_frames: Most frames a video stream may hold (its header's count, else duration times
            frame rate): what a sequential pass might have to decode.
    """

    max_image_pixels: int | None = 8192 * 8192
    max_aspect_ratio: float | None = 200.0
    max_audio_seconds: float | None = None
    min_audio_rate: int | None = 1000
    max_audio_rate: int | None = 192_000
    max_audio_channels: int | None = _MAX_AUDIO_CHANNELS
    max_video_seconds: float | None = None
    max_video_pixels: int | None = 8192 * 8192
    max_video_stream_frames: int | None = None

    def __post_init__(self):
        for name, value in vars(self).items():
            if value is not None and (isinstance(value, bool) or not value > 0):
                raise InputError(f"media limit {name} must be positive or None, got {value!r}")
        if self.max_aspect_ratio is not None and self.max_aspect_ratio < 1:
            raise InputError(f"media limit max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")

    def check_image(self, width: int, height: int, source: str, *, kind: str = "image") -> None:
        """Raises `MediaLimitError` if a `width x height` image (or video frame: `kind="video frame"`) is too big."""
        max_pixels = self.max_video_pixels if kind == "video frame" else self.max_image_pixels
        if max_pixels is not None and width * height > max_pixels:
            raise MediaLimitError(f"{kind} {source} is {width}x{height} = {width * height} pixels, above the "
                                  f"limit of {max_pixels}")
        if self.max_aspect_ratio is not None and min(width, height) > 0:
            ratio = max(width, height) / min(width, height)
            if ratio > self.max_aspect_ratio:
                raise MediaLimitError(f"{kind} {source} is {width}x{height}, an aspect ratio of {ratio:.0f}:1, "
                                      f"above the limit of {self.max_aspect_ratio:g}:1")

    def check_audio(self, rate: int, channels: int, seconds: float | None, source: str) -> None:
        """Raises `MediaLimitError` for an audio stream whose header is out of bounds (`seconds=None`: unknown,
        a rate of 0: unknown; the decoder then finds the rate, or fails on the corrupt file)."""
        if rate > 0 and (self.min_audio_rate is not None and rate < self.min_audio_rate) or (
            self.max_audio_rate is not None and rate > self.max_audio_rate
        ):
            raise MediaLimitError(f"audio {source} has a sample rate of {rate} Hz, outside the accepted "
                                  f"{self.min_audio_rate or 1}..{self.max_audio_rate or 'any'} Hz")
        if self.max_audio_channels is not None and channels > self.max_audio_channels:
            raise MediaLimitError(f"audio {source} has {channels} channels, above the limit of "
                                  f"{self.max_audio_channels}")
        if seconds is not None:
            self.check_audio_seconds(seconds, source)

    def check_audio_seconds(self, seconds: float, source: str) -> None:
        if self.max_audio_seconds is not None and seconds > self.max_audio_seconds:
            raise MediaLimitError(f"audio {source} lasts {_seconds(seconds)}, above the limit of "
                                  f"{self.max_audio_seconds:g} s")


def _seconds(seconds: float) -> str:
    return "more than its header says" if math.isinf(seconds) else f"{seconds:.1f} s"


class _Source:
    """A media file given as a path or as the encoded file's bytes: opens it (as often as needed) and names it."""

    def __init__(self, source: Source, kind: str):
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.data: bytes | None = bytes(source)
            self.path = None
            self.name = f"<{kind} data>"
            if not self.data:
                raise MediaError(f"{kind} data is empty (0 bytes)")
        else:
            self.data = None
            self.path = _existing_file(source, kind)
            self.name = repr(self.path)

    def open(self) -> str | io.BytesIO:
        """What Pillow, soundfile and PyAV open: the path, or a fresh reader over the bytes."""
        return self.path if self.data is None else io.BytesIO(self.data)

    @property
    def suffix(self) -> str:
        return "" if self.path is None else Path(self.path).suffix.lower()


class MediaTruncatedWarning(UserWarning):
    """Media longer than the allowed ``max_seconds`` was cut to its first ``max_seconds``."""


@dataclass
class VideoClip:
    """Frames (and optionally the sound track) sampled from a video file.

    Attributes:
        frames: RGB frames, ``uint8`` of shape ``[F, H, W, 3]``, in time order.
        timestamps: Presentation time of each frame in seconds from the start of the video stream,
            ``float64`` of shape ``[F]``.
        duration: Length in seconds of the span the clip covers: the video stream's duration, or
            ``max_seconds`` when the video was truncated to it.
        audio: The video's own sound track over the same span as ``float32`` mono samples at the
            requested sampling rate, shape ``[T]``; ``None`` if the file has no audio stream, the stream is
            empty, or audio was not requested.
    """

    frames: np.ndarray
    timestamps: np.ndarray
    duration: float
    audio: np.ndarray | None = None


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


_PILLOW_FLAG_LOCK = threading.Lock()


@contextlib.contextmanager
def _strict_pillow():
    """Pillow refuses truncated files while inside, even where a library (lmms-eval does at import) has set the
    process-wide `ImageFile.LOAD_TRUNCATED_IMAGES`, which would fill the missing part with grey silently."""
    from PIL import ImageFile

    with _PILLOW_FLAG_LOCK:
        before, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = before


def load_image(image: Source | Image.Image | np.ndarray, *, limits: MediaLimits | None = None) -> Image.Image:
    """Load an image as an RGB :class:`PIL.Image.Image`.

    Args:
        image: A path to an image file, the file's bytes, a PIL image, or a numpy array of shape ``[H, W]``,
            ``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W, 4]`` holding either ``uint8`` values or floats in ``[0, 1]``.
            Grayscale, palette and RGBA inputs are converted to RGB (alpha is dropped).
        limits: Bounds on pixels and aspect ratio, checked from the file's header before its pixels are decoded
            (default: ``MediaLimits()``).

    Returns:
        The image in mode ``"RGB"``, fully decoded.

    Raises:
        MediaLimitError: The image is larger, or longer and thinner, than ``limits`` allow.
        MediaError: The file is missing, not an image, truncated or corrupt; the image has zero width or
            height; or the array has an unsupported shape, dtype or value range.
        InputError: ``image`` is of an unsupported type.
    """
    limits = limits or MediaLimits()
    if isinstance(image, Image.Image):
        limits.check_image(*image.size, "<PIL image>")
        return _pil_to_rgb(image, source="<PIL image>")
    if isinstance(image, np.ndarray):
        if image.ndim in (2, 3):
            limits.check_image(image.shape[1], image.shape[0], "<image array>")
        return _array_to_image(image)
    if not isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        raise InputError(
            f"load_image expects a path, bytes, a PIL image or a numpy array, got {type(image).__name__}"
        )
    source = _Source(image, "image")
    try:
        with Image.open(source.open()) as opened, _strict_pillow():
            limits.check_image(*opened.size, source.name)  # from the header: nothing is decoded yet
            opened.load()  # decode every byte now, so truncation is detected here
            return _pil_to_rgb(opened, source=source.name)
    except MediaError:
        raise
    except Image.DecompressionBombError as err:  # Pillow's own bound (2 x Image.MAX_IMAGE_PIXELS), at open
        raise MediaLimitError(f"image {source.name} is too large: {err}") from err
    except Image.UnidentifiedImageError as err:
        raise MediaError(f"image {source.name} is not a recognised image format") from err
    except Exception as err:  # Pillow's decoders raise OSError, ValueError, SyntaxError, ...
        raise MediaError(f"image {source.name} could not be decoded (truncated or corrupt): {err}") from err


def _pil_to_rgb(image: Image.Image, *, source: str) -> Image.Image:
    """Convert a PIL image to RGB after checking it is not empty (`source`: the image's name, quoted)."""
    width, height = image.size
    if width == 0 or height == 0:
        raise MediaError(f"image {source} is empty ({width}x{height} pixels)")
    try:
        return image.convert("RGB")  # a copy even when the mode is already RGB
    except Exception as err:  # a lazily opened image is decoded here
        raise MediaError(f"image {source} could not be decoded (truncated or corrupt): {err}") from err


def _array_to_image(array: np.ndarray) -> Image.Image:
    """Convert an ``[H, W]`` / ``[H, W, C]`` uint8 or [0, 1] float array to an RGB image."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise MediaError(
            f"image array has shape {array.shape}; expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise MediaError(f"image array is empty (shape {array.shape})")
    if array.dtype == np.uint8:
        pixels = array
    elif np.issubdtype(array.dtype, np.floating):
        low, high = float(np.min(array)), float(np.max(array))
        if not (math.isfinite(low) and math.isfinite(high)) or low < 0.0 or high > 1.0:
            raise MediaError(f"float image array must hold values in [0, 1], got range [{low}, {high}]")
        pixels = np.round(array * 255.0).astype(np.uint8)
    else:
        raise MediaError(f"image array has dtype {array.dtype}; expected uint8 or floats in [0, 1]")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[pixels.ndim if pixels.ndim == 2 else pixels.shape[-1]]
    return Image.fromarray(np.ascontiguousarray(pixels), mode=mode).convert("RGB")


# --------------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------------


def load_audio(
    audio: Source | tuple[np.ndarray, int] | np.ndarray,
    *,
    sampling_rate: int = 16000,
    max_seconds: float | None = None,
    limits: MediaLimits | None = None,
) -> np.ndarray:
    """Load audio as ``float32`` mono samples at ``sampling_rate``.

    Args:
        audio: One of

            - a path (or the file's bytes): WAV/FLAC/OGG are read with soundfile; MP3, the sound track of
              MP4/MKV/WebM and anything soundfile cannot read are decoded with PyAV;
            - a ``(samples, sample_rate)`` tuple, ``samples`` of shape ``[T]`` or ``[T, channels]``;
            - a bare array of shape ``[T]`` or ``[T, channels]``, assumed to be at ``sampling_rate`` already.

            Integer samples are scaled to ``[-1, 1]`` by their dtype's range. Several channels are averaged.
        sampling_rate: Output sample rate in Hz; other rates are resampled with soxr (high quality).
        max_seconds: If given, audio longer than this is cut to its first ``max_seconds`` seconds and a
            :class:`MediaTruncatedWarning` is issued.
        limits: Bounds on sample rate, channels and duration, checked from the header before decoding
            (default: ``MediaLimits()``); audio longer than ``limits.max_audio_seconds`` is refused, not cut.

    Returns:
        ``float32`` samples of shape ``[T]`` at ``sampling_rate``.

    Raises:
        MediaLimitError: The audio's rate, channels or duration are outside ``limits``.
        MediaError: The file is missing, empty, unreadable or corrupt, has no audio stream, or holds no
            samples; or an array has an unsupported shape or non-finite values.
        InputError: A bad argument (non-positive ``sampling_rate``/``max_seconds`` or sample rate in the
            tuple, unsupported input type).
    """
    sampling_rate = _positive_int(sampling_rate, "sampling_rate")
    max_seconds = _positive_seconds_or_none(max_seconds)
    limits = limits or MediaLimits()

    if isinstance(audio, tuple):
        if len(audio) != 2:
            raise InputError(f"an audio tuple must be (samples, sample_rate), got {len(audio)} elements")
        samples, source_rate = audio
        source_rate = _positive_int(source_rate, "the audio tuple's sample rate")
        mono = _array_audio(np.asarray(samples), source_rate, limits)
        full_duration = mono.shape[0] / source_rate
        mono = _truncate(mono, source_rate, max_seconds, source="<audio array>", duration=full_duration)
    elif isinstance(audio, np.ndarray):
        source_rate = sampling_rate
        mono = _array_audio(audio, source_rate, limits)
        full_duration = mono.shape[0] / source_rate
        mono = _truncate(mono, source_rate, max_seconds, source="<audio array>", duration=full_duration)
    elif isinstance(audio, (str, os.PathLike, bytes, bytearray, memoryview)):
        mono, source_rate = _read_audio_file(_Source(audio, "audio"), max_seconds=max_seconds, limits=limits)
    else:
        raise InputError(
            f"load_audio expects a path, bytes, a numpy array or a (samples, sample_rate) tuple, "
            f"got {type(audio).__name__}"
        )
    return _resample(mono, source_rate, sampling_rate)


def _array_audio(samples: np.ndarray, rate: int, limits: MediaLimits) -> np.ndarray:
    """An in-memory clip as mono, checked against `limits` (rate, length)."""
    mono = _array_to_mono(samples, source="<audio array>")  # at most _MAX_AUDIO_CHANNELS channels
    limits.check_audio(rate, 1, mono.shape[0] / rate, "<audio array>")
    return mono


def _decode_cap(max_seconds: float | None, limits: MediaLimits) -> tuple[float | None, bool]:
    """Seconds to decode at most, and whether reaching them means refusing (the limit) rather than cutting."""
    if limits.max_audio_seconds is not None and (max_seconds is None or limits.max_audio_seconds < max_seconds):
        return limits.max_audio_seconds, True
    return max_seconds, False


def _read_audio_file(source: _Source, *, max_seconds: float | None, limits: MediaLimits) -> tuple[np.ndarray, int]:
    """Decode an audio file to mono ``float32`` at its own rate, cut to ``max_seconds`` (with a warning).

    The header (rate, channels, length) is checked against ``limits`` first; decoding then stops at the cap.
    """
    cap, refuse = _decode_cap(max_seconds, limits)
    name = source.name
    if source.data is not None or source.suffix in _SOUNDFILE_SUFFIXES:
        try:
            info = soundfile.info(source.open())
        except Exception:  # soundfile cannot read it (or it is corrupt): let FFmpeg try, it reports the error
            info = None
        if info is not None and info.samplerate > 0:
            # the header's length is what soundfile will read, so the limit is checked on it, once
            limits.check_audio(info.samplerate, info.channels, info.frames / info.samplerate, name)
            limit = None if max_seconds is None else int(max_seconds * info.samplerate)
            frames = -1 if limit is None or info.frames <= limit else limit
            try:
                mono = _read_soundfile_blocks(source, frames, name)
            except MediaError:
                raise
            except Exception:  # a header soundfile reads but data it cannot: let FFmpeg try
                pass
            else:
                if frames != -1:
                    _warn_truncated(name, "audio", info.frames / info.samplerate, max_seconds, stacklevel=4)
                return mono, int(info.samplerate)

    with _open_av(source, "audio") as container:
        if not container.streams.audio:
            raise MediaError(f"audio {name} has no audio stream")
        stream = container.streams.audio[0]
        limits.check_audio(stream.sample_rate or 0, stream.channels or 0, _stream_duration(container, stream), name)
        decoded = _decode_av_audio(container, stream, name, max_seconds=cap)
    if decoded is None:
        raise MediaError(f"audio {name} contains no audio samples (zero-length audio)")
    mono, rate, full_duration = decoded
    if full_duration is not None:
        if refuse:
            limits.check_audio_seconds(full_duration, name)
        _warn_truncated(name, "audio", full_duration, max_seconds, stacklevel=4)
    return mono, rate


def _read_soundfile_blocks(source: _Source, frames: int, name: str) -> np.ndarray:
    """Reads `frames` frames (-1: all) with soundfile, downmixing block by block (only the mono copy is kept)."""
    blocks = []
    with soundfile.SoundFile(source.open()) as f:
        for block in f.blocks(blocksize=_AUDIO_BLOCK_FRAMES, frames=frames, dtype="float32", always_2d=True):
            if len(block):
                blocks.append(_array_to_mono(block, source=name))
    if not blocks:
        raise MediaError(f"audio {name} contains no samples (zero-length audio)")
    return np.concatenate(blocks) if len(blocks) > 1 else blocks[0]


def _decode_av_audio(
    container: av.container.InputContainer,
    stream: av.AudioStream,
    name: str,
    *,
    max_seconds: float | None,
) -> tuple[np.ndarray, int, float | None] | None:
    """Decode one audio stream with PyAV to mono ``float32`` at the stream's own rate.

    Decoding stops once ``max_seconds`` of audio are collected; each decoded frame is downmixed at once, so only
    the mono copy is kept.

    Returns:
        ``(samples [T], sample_rate, full_duration)``, where ``full_duration`` is the stream's duration in
        seconds if the audio was cut to ``max_seconds`` (``math.inf`` if the container does not say), else
        ``None``; or ``None`` if the stream holds no samples.
    """
    # Keep the stream's own layout and rate; only the sample format is unified (float, planar).
    resampler = av.AudioResampler(format="fltp")
    chunks: list[np.ndarray] = []  # each [n], mono
    rate: int | None = None
    collected = 0
    limit: int | None = None
    truncated = False
    try:
        for frame in container.decode(stream):
            for converted in resampler.resample(frame):
                if rate is None:
                    rate = converted.sample_rate
                    limit = None if max_seconds is None else int(max_seconds * rate)
                chunks.append(converted.to_ndarray().mean(axis=0, dtype=np.float32))  # [channels, n] -> [n]
                collected += converted.samples
            if limit is not None and collected > limit:
                truncated = True
                break
        if not truncated:
            for converted in resampler.resample(None):  # flush
                chunks.append(converted.to_ndarray().mean(axis=0, dtype=np.float32))
                collected += converted.samples
    except Exception as err:  # FFmpeg decode errors
        raise MediaError(f"audio in {name} could not be decoded (corrupt data): {err}") from err
    if collected == 0 or rate is None:
        return None
    mono = np.concatenate(chunks)
    if limit is not None and mono.shape[0] > limit:
        truncated = True
        mono = mono[:limit]
    full_duration = None
    if truncated:
        full_duration = _stream_duration(container, stream) or math.inf
    return np.ascontiguousarray(mono), rate, full_duration


def _array_to_mono(samples: np.ndarray, *, source: str) -> np.ndarray:
    """Turn ``[T]`` or ``[T, channels]`` samples of any numeric dtype into ``float32`` mono ``[T]``."""
    if samples.ndim not in (1, 2):
        raise MediaError(f"audio {source!r} has shape {samples.shape}; expected [T] or [T, channels]")
    if np.issubdtype(samples.dtype, np.integer):
        info = np.iinfo(samples.dtype)
        offset = (int(info.max) + int(info.min) + 1) / 2  # 128 for uint8, 0 for signed types
        samples = (samples.astype(np.float64) - offset) / (int(info.max) - offset + 1)
    elif not np.issubdtype(samples.dtype, np.floating):
        raise MediaError(f"audio {source!r} has dtype {samples.dtype}; expected floating or integer samples")
    if samples.ndim == 2:
        if samples.shape[1] == 0:
            raise MediaError(f"audio {source!r} has shape {samples.shape}: no channels")
        if samples.shape[1] > _MAX_AUDIO_CHANNELS:
            raise MediaError(
                f"audio {source!r} has shape {samples.shape}, read as [T, channels] that is "
                f"{samples.shape[1]} channels; pass [channels, T] arrays transposed (samples.T)"
            )
        samples = samples.mean(axis=1)
    if samples.shape[0] == 0:
        raise MediaError(f"audio {source!r} contains no samples (zero-length audio)")
    mono = np.ascontiguousarray(samples, dtype=np.float32)
    if not np.all(np.isfinite(mono)):
        raise MediaError(f"audio {source!r} contains NaN or infinite samples")
    return mono


def _truncate(
    samples: np.ndarray, rate: int, max_seconds: float | None, *, source: str, duration: float
) -> np.ndarray:
    """Cut ``samples`` to ``max_seconds`` with a warning, if they are longer."""
    if max_seconds is None or samples.shape[0] <= int(max_seconds * rate):
        return samples
    _warn_truncated(source, "audio", duration, max_seconds, stacklevel=4)
    return samples[: int(max_seconds * rate)]


def _resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Resample mono ``float32`` samples with soxr (high quality); a no-op when the rates match."""
    if source_rate == target_rate:
        return samples
    resampled = soxr.resample(samples, source_rate, target_rate, quality="HQ")
    return np.ascontiguousarray(resampled, dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------------------


def load_video(
    path: Source,
    *,
    num_frames: int = 8,
    with_audio: bool = True,
    sampling_rate: int = 16000,
    max_seconds: float | None = None,
    limits: MediaLimits | None = None,
) -> VideoClip:
    """Decode ``num_frames`` uniformly sampled frames (and the sound track) of a video file.

    Frame-sampling rule: let ``D`` be the duration of the span sampled (the video stream's duration, or
    ``max_seconds`` if the video is longer) and ``F = num_frames``. The span is split into ``F`` equal
    segments and each segment's centre ``t_i = (i + 0.5) * D / F`` (seconds from the start of the video
    stream) takes the decoded frame whose timestamp is nearest to it (the earlier frame on a tie). With a
    constant frame rate and more than ``F`` frames in the span this gives ``F`` distinct frames; if the span
    holds at most ``F`` frames, all of them are returned instead. (With very irregular timestamps two targets
    can pick the same frame; it is then returned twice, so ``F`` frames come back whenever the span holds more
    than ``F``.)

    Short spans are decoded in a single pass that stops after the last frame needed; when targets are
    ``_SEEK_MIN_SPACING_S`` seconds or more apart, each is reached by seeking to the keyframe before it
    instead, so a long video is not decoded end to end.

    Args:
        path: Path to a video file in any container/codec FFmpeg reads (MP4, MKV, WebM, AVI, ...), or its bytes.
        num_frames: Number of frames to sample, at least 1.
        with_audio: Also decode the video's own sound track into ``VideoClip.audio``.
        sampling_rate: Sample rate in Hz of ``VideoClip.audio``.
        max_seconds: If given, a video longer than this is sampled only within its first ``max_seconds`` (its
            audio is cut to the same span) and a :class:`MediaTruncatedWarning` is issued.
        limits: Bounds checked from the container before any frame is decoded (default: ``MediaLimits()``):
            frame size and aspect ratio, the stream's duration and frame count, and, when ``with_audio``, the
            sound track's rate, channels and duration (over the span used) against the audio bounds.

    Returns:
        The sampled :class:`VideoClip`.

    Raises:
        MediaLimitError: The video (or its sound track) is outside ``limits``.
        MediaError: The file is missing, empty, not a video (no video stream), corrupt, or has no decodable
            frame.
        InputError: A bad argument (``num_frames < 1``, non-positive ``sampling_rate`` or ``max_seconds``).
    """
    num_frames = _positive_int(num_frames, "num_frames")
    sampling_rate = _positive_int(sampling_rate, "sampling_rate")
    max_seconds = _positive_seconds_or_none(max_seconds)
    limits = limits or MediaLimits()
    source = _Source(path, "video")
    name = source.name

    with _open_av(source, "video") as container:
        if not container.streams.video:
            raise MediaError(f"file {name} has no video stream (is it a video?)")
        stream = container.streams.video[0]
        limits.check_image(stream.codec_context.width, stream.codec_context.height, name, kind="video frame")
        stream.thread_type = "AUTO"
        full_duration = _stream_duration(container, stream)
        if full_duration is None:
            full_duration = _probe_duration(container, stream, name)
        if limits.max_video_seconds is not None and full_duration > limits.max_video_seconds:
            raise MediaLimitError(f"video {name} lasts {full_duration:.1f} s, above the limit of "
                                  f"{limits.max_video_seconds:g} s")
        span = full_duration if max_seconds is None else min(full_duration, max_seconds)
        _check_frame_count(stream, full_duration, limits, name)
        track = container.streams.audio[0] if with_audio and container.streams.audio else None
        track_span = None if span >= full_duration else span  # the track is cut only where the video is
        if track is not None:  # the sound track is audio: the audio bounds apply to what of it is used
            track_seconds = _stream_duration(container, track)
            if track_seconds is not None and track_span is not None:
                track_seconds = min(track_seconds, track_span)
            limits.check_audio(track.sample_rate or 0, track.channels or 0, track_seconds, f"track of {name}")
        if span < full_duration:
            _warn_truncated(name, "video", full_duration, max_seconds, stacklevel=3)
        targets = (np.arange(num_frames) + 0.5) * span / num_frames  # [F], seconds from stream start

        picked = None
        if _worth_seeking(stream, span, num_frames):
            picked = _sample_by_seeking(container, stream, name, targets, limits)
            if picked is None:
                _rewind(container, name)  # the seek attempt gave up part-way: start over sequentially
        if picked is None:
            picked = _sample_sequentially(container, stream, name, targets, span, limits)
        frames, timestamps = picked

    audio = None
    if track is not None:
        # A second, independent reader for the sound track: no dependence on rewinding the first one.
        cap, refuse = _decode_cap(track_span, limits)
        with _open_av(source, "video") as container:
            decoded = _decode_av_audio(container, container.streams.audio[0], name, max_seconds=cap)
        if decoded is not None:
            samples, rate, cut_from = decoded
            if refuse and cut_from is not None:  # longer than the limit, though its header did not say so
                limits.check_audio_seconds(cut_from, f"track of {name}")
            audio = _resample(samples, rate, sampling_rate)

    return VideoClip(
        frames=np.stack(frames),
        timestamps=np.asarray(timestamps, dtype=np.float64),
        duration=float(span),
        audio=audio,
    )


def _check_frame_count(stream: av.VideoStream, duration: float, limits: MediaLimits, name: str) -> None:
    """Refuses a stream with more frames than `limits.max_video_stream_frames` (header count, else duration x rate)."""
    if limits.max_video_stream_frames is None:
        return
    count = float(stream.frames) if stream.frames else duration * float(stream.average_rate or 0)
    if count > limits.max_video_stream_frames:
        raise MediaLimitError(f"video {name} holds about {count:.0f} frames, above the limit of "
                              f"{limits.max_video_stream_frames}")


def _worth_seeking(stream: av.VideoStream, span: float, num_frames: int) -> bool:
    """Whether to reach each target by seeking rather than decode the span in one pass.

    Seeking pays off when targets are far apart and the span surely holds many more frames than targets
    (a single-picture "video" with a long sound track must take the sequential path, which returns its
    frames once each).
    """
    if span / num_frames < _SEEK_MIN_SPACING_S:
        return False
    if stream.frames:
        frame_count = float(stream.frames)
    elif stream.average_rate:
        frame_count = span * float(stream.average_rate)
    else:
        return False
    return frame_count > 2 * num_frames


def _rewind(container: av.container.InputContainer, name: str) -> None:
    """Seek back to the start of the file."""
    try:
        container.seek(0)
    except Exception as err:
        raise MediaError(f"video {name} could not be rewound (corrupt index?): {err}") from err


def _sample_sequentially(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    name: str,
    targets: np.ndarray,
    span: float,
    limits: MediaLimits,
) -> tuple[list[np.ndarray], list[float]]:
    """Decode the span in one pass, giving each target time its nearest frame (see :func:`load_video`).

    Only the chosen frames are converted to RGB. The first ``F`` decoded frames are kept as well, in case the
    span holds no more than ``F`` frames and all of them are returned.
    """
    num_frames = len(targets)
    start = _stream_start(stream)
    chosen: list[tuple[float, np.ndarray]] = []
    first_frames: list[tuple[float, av.VideoFrame]] | None = []  # None once the span has > F frames
    previous: tuple[float, av.VideoFrame] | None = None
    last_converted: tuple[float, np.ndarray] | None = None
    index = 0
    try:
        for frame in container.decode(stream):
            limits.check_image(frame.width, frame.height, name, kind="video frame")  # a stream may change size
            time = _frame_time(frame, index, stream, start)
            index += 1
            if time >= span and previous is not None:
                break  # past the sampled span
            if first_frames is not None:
                first_frames.append((time, frame))
                if len(first_frames) > num_frames:
                    first_frames = None
            while len(chosen) < num_frames and time >= targets[len(chosen)]:
                target = targets[len(chosen)]
                if previous is not None and target - previous[0] <= time - target:
                    best_time, best = previous
                else:
                    best_time, best = time, frame
                if last_converted is None or last_converted[0] != best_time:
                    last_converted = (best_time, _to_rgb(best))
                chosen.append(last_converted)
            if len(chosen) == num_frames and first_frames is None:
                break  # every target has its frame
            previous = (time, frame)
    except MediaError:
        raise
    except Exception as err:  # FFmpeg decode errors
        raise MediaError(f"video {name} could not be decoded (corrupt data): {err}") from err

    if previous is None and not chosen:
        raise MediaError(f"video {name} has no decodable frames")
    if first_frames is not None:  # at most F frames in the span: return them all
        return [_to_rgb(frame) for _, frame in first_frames], [time for time, _ in first_frames]
    while len(chosen) < num_frames:  # targets after the last frame of the span take that frame
        last_time, last_frame = previous
        if last_converted is None or last_converted[0] != last_time:
            last_converted = (last_time, _to_rgb(last_frame))
        chosen.append(last_converted)
    return [rgb for _, rgb in chosen], [time for time, _ in chosen]


def _sample_by_seeking(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    name: str,
    targets: np.ndarray,
    limits: MediaLimits,
) -> tuple[list[np.ndarray], list[float]] | None:
    """Reach each target time by seeking to the keyframe before it; same rule as the sequential pass.

    Returns:
        The frames and timestamps, or ``None`` if the container cannot seek reliably (then the caller decodes
        sequentially).
    """
    start = _stream_start(stream)
    rate = float(stream.average_rate) if stream.average_rate else 25.0
    frames: list[np.ndarray] = []
    timestamps: list[float] = []
    for target in targets:
        # Aim one frame early so the frame just before the target is decoded too.
        seek_seconds = max(0.0, target - 1.0 / rate)
        offset = int((seek_seconds + start) / stream.time_base)
        previous: tuple[float, av.VideoFrame] | None = None
        best: tuple[float, av.VideoFrame] | None = None
        try:
            container.seek(offset, stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if frame.time is None:
                    return None
                time = float(frame.time) - start
                if time >= target:
                    if previous is not None and target - previous[0] <= time - target:
                        best = previous
                    else:
                        best = (time, frame)
                    break
                previous = (time, frame)
        except Exception:  # the container cannot seek here; fall back to the sequential pass
            return None
        if best is None:
            best = previous  # the target lies after the last frame
        if best is None or (previous is None and best[0] > target and best[0] - target > 1.0 / rate):
            return None  # the seek landed after the target: the index is not trustworthy
        limits.check_image(best[1].width, best[1].height, name, kind="video frame")
        frames.append(_to_rgb(best[1]))
        timestamps.append(best[0])
    return frames, timestamps


def _probe_duration(container: av.container.InputContainer, stream: av.VideoStream, name: str) -> float:
    """Duration of a video stream whose container does not record it: demux (no decode) its packets."""
    start = _stream_start(stream)
    end = 0.0
    try:
        for packet in container.demux(stream):
            if packet.pts is None:
                continue
            packet_end = (packet.pts + (packet.duration or 0)) * packet.time_base - start
            end = max(end, float(packet_end))
    except Exception as err:
        raise MediaError(f"video {name} could not be read (corrupt data): {err}") from err
    _rewind(container, name)
    if end <= 0.0:
        raise MediaError(f"video {name} has no decodable frames")
    return end


def _stream_duration(container: av.container.InputContainer, stream: av.stream.Stream) -> float | None:
    """A stream's duration in seconds from the file's metadata, or ``None`` if it is not recorded."""
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


def _stream_start(stream: av.stream.Stream) -> float:
    """A stream's start time in seconds (timestamps are reported relative to it)."""
    if stream.start_time is None or stream.time_base is None:
        return 0.0
    return float(stream.start_time * stream.time_base)


def _frame_time(frame: av.VideoFrame, index: int, stream: av.VideoStream, start: float) -> float:
    """A frame's presentation time in seconds from the stream start (estimated from the rate if unknown)."""
    if frame.time is not None:
        return float(frame.time) - start
    rate = float(stream.average_rate) if stream.average_rate else 25.0
    return index / rate


def _to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """A decoded frame as ``uint8`` RGB ``[H, W, 3]``."""
    return frame.to_ndarray(format="rgb24")


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


def _existing_file(path: PathLike, kind: str) -> str:
    """Check that ``path`` names a non-empty regular file and return it as a string."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MediaError(f"{kind} file {path!r} does not exist")
    if not os.path.isfile(path):
        raise MediaError(f"{kind} path {path!r} is not a file")
    if os.path.getsize(path) == 0:
        raise MediaError(f"{kind} file {path!r} is empty (0 bytes)")
    return path


def _open_av(source: _Source, kind: str) -> av.container.InputContainer:
    """Open a file (or bytes) with PyAV, turning FFmpeg's errors into :class:`MediaError`."""
    try:
        # FFmpeg's stream probe decodes a frame of each stream unless told to skip: for an 8176 x 8176 video that is
        # 140 MB before any limit could be checked. Skipping changes only the probe, not the decoding after it.
        return av.open(source.open(), mode="r", stream_options=[{"skip_frame": "all"}] * _PROBED_STREAMS)
    except Exception as err:  # av.error.* (InvalidDataError, ...), OSError, UnicodeDecodeError, ...
        raise MediaError(
            f"{kind} {source.name} could not be opened (not a media file, or corrupt): {err}"
        ) from err


def _warn_truncated(source: str, kind: str, duration: float, max_seconds: float, *, stacklevel: int) -> None:
    """Issue a :class:`MediaTruncatedWarning` for media cut to ``max_seconds``.

    ``stacklevel`` counts from this function, so that the warning points at the caller of the public loader.
    """
    length = "of unknown length" if math.isinf(duration) else f"{duration:.2f} s long"
    warnings.warn(
        f"{kind} {source!r} is {length}; only its first {max_seconds:g} s are used "
        f"(max_seconds={max_seconds:g})",
        MediaTruncatedWarning,
        stacklevel=stacklevel,
    )


def _positive_int(value: object, name: str) -> int:
    """Validate a positive integer argument (integral floats such as ``16000.0`` are accepted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    if not float(value).is_integer() or value <= 0:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _positive_seconds_or_none(max_seconds: float | None) -> float | None:
    """Validate ``max_seconds``: ``None`` or a positive, finite number of seconds."""
    if max_seconds is None:
        return None
    if isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float, np.integer, np.floating)):
        raise InputError(f"max_seconds must be a positive number of seconds or None, got {max_seconds!r}")
    if not math.isfinite(max_seconds) or max_seconds <= 0:
        raise InputError(f"max_seconds must be a positive number of seconds or None, got {max_seconds!r}")
    return float(max_seconds)
