"""Ola compatibility mode: the preprocessing the released Ola weights were trained and evaluated with.

Converted Ola checkpoints (`omniola convert ola`) select this mode with `OlaProcessorSettings.preprocessing = "ola"`.
Everything here is a plain function of arrays and PIL images; `OlaProcessor` calls them. The original code reads its
settings from environment variables set at the top of `inference/infer.py`; their values are the constants and
processor settings below:

    LOWRES_RESIZE=384x32  HIGHRES_BASE=0x32  MAXRES=1536  MINRES=0  PAD2STRIDE=1
    VIDEO_RESIZE=0x64     VIDEO_MINRES=288   VIDEO_MAXRES=480

Images (`process_anyres_highres_image`). The *high-resolution* view keeps the image as it is, pasted centred on a
canvas of value 127 whose sides are rounded up to multiples of 32; only an image larger than `MAXRES^2` pixels is
resized instead (down to that area, sides rounded down to multiples of 32). The *low-resolution* view is computed
FROM THE PADDED high-resolution image (not from the original): scaled to an area of about 384^2 with sides
`int(side * scale / 32) * 32`, using Pillow's default resampling filter (bicubic for RGB). omniola's two image views
are `[global, native]` = Ola's `[low-res, high-res]`, joined by the same begin/separator/end embeddings.

Video frames (`process_anyres_video`). A frame whose area lies between `VIDEO_MINRES^2` and `VIDEO_MAXRES^2` is padded
(value 127, centred) to multiples of 64; a smaller or larger one is scaled to that bound with sides
`int(side * scale / 64) * 64`. Every frame reaches the LLM, as in training (`ola/train/train.py` batches a video as
one item of F frames). The original `inference/infer.py` passes the frames in a layout that makes
`prepare_inputs_labels_for_speech_vision_text` treat them as batch items, so only the FIRST frame reaches the LLM
there; compatibility mode follows training, not that quirk. The original samples 64 frames with `np.linspace` over
the frame indices (decord); omniola's `load_video` takes the frames nearest to 64 evenly spaced instants.

Audio (`inference/infer.py::load_audio`). 16 kHz mono, cut into 30 s chunks (480000 samples), every chunk zero-padded
to 30 s, at most 25 chunks (`OlaProcessor` with `audio_padding="fixed"` and `max_audio_seconds=750`); each chunk
becomes openai-whisper's `log_mel_spectrogram(chunk, n_mels=128)`, reproduced
exactly by `log_mel_spectrogram` below (same STFT, the same slaney mel filterbank as whisper's `mel_filters.npz`, the
same clamp / dynamic-range / scaling); BEATs receives the same padded 30 s waveforms.

Prompts (`ola/conversation.py`, `conv_templates["qwen_1_5"]`): ChatML with the fixed system prompt "You are a helpful
assistant." and `<|im_end|>` as the stop string. The original always inserts image/video features before speech
features, whatever the order of the placeholders in the prompt; `user_content` therefore writes visual markers
before audio markers, which gives the same embedding layout with omniola's scatter-at-the-placeholder model.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from .errors import InputError

# LOWRES_RESIZE=384x32 / HIGHRES_BASE=0x32: image sides are multiples of 32 (= patch 16 * 2x2 pooling).
IMAGE_STRIDE = 32
# VIDEO_RESIZE=0x64: video frame sides are multiples of 64.
VIDEO_STRIDE = 64
# PAD2STRIDE pads with this grey value.
PAD_VALUE = 127

SAMPLING_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160

SYSTEM_PROMPT = "You are a helpful assistant."
STOP_STRINGS = ("<|im_end|>",)
# conv_templates["qwen_1_5"] rendered as a chat template: "<|im_start|>system\n...<|im_end|>\n" once, then
# "<|im_start|>{role}\n{content}<|im_end|>\n" per message, then "<|im_start|>assistant\n" to prompt an answer. The
# original has a fixed system prompt; a system message given here replaces it.
CHAT_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{% set rest = messages[1:] %}"
    "{% else %}{{ '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}{% set rest = messages %}{% endif %}"
    "{% for message in rest %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# ------------------------------------------------------------------------------------------------------------ images
def _scaled(width: int, height: int, scale: float, stride: int) -> tuple[int, int]:
    """Sides scaled and rounded DOWN to multiples of `stride` (at least one stride), as the original does."""
    return max(int(width * scale / stride) * stride, stride), max(int(height * scale / stride) * stride, stride)


def _padded(width: int, height: int, stride: int) -> tuple[int, int]:
    return math.ceil(width / stride) * stride, math.ceil(height / stride) * stride


def _bounded_size(
    width: int, height: int, stride: int, min_pixels: int, max_pixels: int
) -> tuple[tuple[int, int], bool]:
    """`((w, h), resized)`: the size `resize_images` / `resize_video` give with `base_size=0` and PAD2STRIDE."""
    if width < 1 or height < 1:
        raise InputError(f"image has no pixels ({width}x{height})")
    area = width * height
    if area > max_pixels:
        return _scaled(width, height, math.sqrt(max_pixels / area), stride), True
    if area < min_pixels:
        return _scaled(width, height, math.sqrt(min_pixels / area), stride), True
    return _padded(width, height, stride), False


def _resize_or_pad(image: Image.Image, size: tuple[int, int], resized: bool) -> Image.Image:
    if resized:
        return image.resize(size)  # Pillow's default filter (bicubic for RGB), as the original
    canvas = Image.new("RGB", size, (PAD_VALUE,) * 3)
    canvas.paste(image, ((size[0] - image.width) // 2, (size[1] - image.height) // 2))
    return canvas


def image_view_sizes(
    width: int, height: int, *, max_pixels: int, min_pixels: int, lowres_pixels: int
) -> list[tuple[int, int]]:
    """`[(w, h) of the low-resolution view, (w, h) of the high-resolution view]` of a `width x height` image."""
    high, _ = _bounded_size(width, height, IMAGE_STRIDE, min_pixels, max_pixels)
    low = _scaled(*high, math.sqrt(lowres_pixels / (high[0] * high[1])), IMAGE_STRIDE)
    return [low, high]


def image_views(
    image: Image.Image, *, max_pixels: int, min_pixels: int, lowres_pixels: int
) -> list[Image.Image]:
    """The low- and high-resolution views of an RGB image, in that order (omniola's `[global, native]`)."""
    high_size, resized = _bounded_size(*image.size, IMAGE_STRIDE, min_pixels, max_pixels)
    high = _resize_or_pad(image, high_size, resized)
    low_size = image_view_sizes(*image.size, max_pixels=max_pixels, min_pixels=min_pixels,
                                lowres_pixels=lowres_pixels)[0]
    return [high.resize(low_size), high]  # the low-res view comes from the padded image (original quirk)


def video_frame_size(width: int, height: int, *, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """`(w, h)` of a `width x height` video frame after the original's resize-or-pad."""
    return _bounded_size(width, height, VIDEO_STRIDE, min_pixels, max_pixels)[0]


def video_frame(image: Image.Image, *, min_pixels: int, max_pixels: int) -> Image.Image:
    """One RGB video frame resized (outside the area bounds) or padded (inside) to multiples of 64."""
    size, resized = _bounded_size(*image.size, VIDEO_STRIDE, min_pixels, max_pixels)
    return _resize_or_pad(image, size, resized)


# ------------------------------------------------------------------------------------------------------------- audio
def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above (librosa's `hz_to_mel(htk=False)`)."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    logstep = np.log(6.4) / 27.0
    linear = hz / f_sp
    return np.where(hz >= min_log_hz, min_log_hz / f_sp + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep,
                    linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)


@lru_cache(maxsize=4)
def mel_filters(n_mels: int) -> torch.Tensor:
    """The slaney-normalised mel filterbank `[n_mels, N_FFT // 2 + 1]` of `librosa.filters.mel(sr=16000, n_fft=400)`.

    Computed in float64 and stored in float32 exactly as librosa does (rounding to float32 before the slaney
    normalisation), so it equals the matrices in openai-whisper's `assets/mel_filters.npz` bit for bit.
    """
    fft_freqs = np.fft.rfftfreq(n=N_FFT, d=1.0 / SAMPLING_RATE)  # (201,)
    mel_edges = np.linspace(_hz_to_mel(np.float64(0.0)), _hz_to_mel(np.float64(SAMPLING_RATE / 2)), n_mels + 2)
    hz_edges = _mel_to_hz(mel_edges)  # (n_mels + 2,)
    widths = np.diff(hz_edges)
    ramps = np.subtract.outer(hz_edges, fft_freqs)  # (n_mels + 2, 201)
    weights = np.zeros((n_mels, len(fft_freqs)), dtype=np.float32)
    for i in range(n_mels):
        weights[i] = np.maximum(0, np.minimum(-ramps[i] / widths[i], ramps[i + 2] / widths[i + 1]))
    weights *= (2.0 / (hz_edges[2 : n_mels + 2] - hz_edges[:n_mels]))[:, None]
    return torch.from_numpy(weights)


def log_mel_spectrogram(chunk: np.ndarray, n_mels: int = 128) -> torch.Tensor:
    """openai-whisper's `log_mel_spectrogram`: `[samples]` float32 at 16 kHz -> `[n_mels, samples // 160]`."""
    audio = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT), return_complex=True)
    power = stft[..., :-1].abs() ** 2  # (201, T): the last frame is dropped, as in whisper
    log_spec = torch.clamp(mel_filters(n_mels) @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


# ----------------------------------------------------------------------------------------------------------- prompts
def user_content(pieces: list[str], image_marker: str, video_marker: str, audio_marker: str) -> str:
    """Joins a user message's text pieces and media markers as `inference/infer.py` builds its prompts.

    - image or video + text: `<image>\\n{text}`;
    - video with its sound track: `<video><audio>\\n{text}` (infer.py writes `<speech><image>` but inserts the image
      features first);
    - image + audio (a spoken question about an image): `<image>\\nUser's question in speech: <audio>\\n`, followed
      by the text if there is any (infer.py has no text in this case);
    - audio + text: `<audio>\\n{text}`; text alone: `{text}`.
    Visual markers always precede audio markers (the original's embedding order).
    """
    visual = [p for p in pieces if p in (image_marker, video_marker)]
    audio = [p for p in pieces if p == audio_marker]
    text = "\n".join(p for p in pieces if p not in (image_marker, video_marker, audio_marker))
    if visual and audio and video_marker not in visual:
        return "".join(visual) + "\nUser's question in speech: " + "".join(audio) + "\n" + text
    markers = "".join(visual + audio)
    return markers + "\n" + text if markers else text
