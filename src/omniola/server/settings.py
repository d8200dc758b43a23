"""Limits and switches of the OpenAI-compatible server; every knob is a field (and a `omniola serve` flag).

docs/serving.md lists each limit and what happens past it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from ..media import MediaLimits
from ..speech import SpeechBackend

API_KEY_ENV = "OMNIOLA_API_KEY"
# Text longer than `max_prompt_tokens * MAX_CHARS_PER_TOKEN` characters is refused before it is tokenized (30 MB of
# text took 31 s and 4.3 GB to tokenize). English averages about 4 characters a token in omniola's tokenizers
# (Qwen2, SmolLM2), so only text that would exceed `max_prompt_tokens` anyway is refused this early.
MAX_CHARS_PER_TOKEN = 16


@dataclass
class ServerSettings:
    """What the server accepts and how much work it takes on.

    Attributes:
        model_name: the id reported by `GET /v1/models` and echoed in responses.
        api_keys: accepted `Authorization: Bearer` keys; empty means no authentication.
        max_body_bytes: largest request body (media arrive base64-encoded inside it); also the largest remote file.
        max_image_pixels: largest image (width * height) accepted, read from its header before decoding.
        max_aspect_ratio: longest over shortest side of an image or video frame (Qwen2-VL's 200:1).
        max_audio_seconds: longest audio input accepted, a video's sound track included (longer is a 400, not a
            silent cut), read from the header (or found by a decode capped there).
        max_video_seconds: longest video accepted.
        max_video_pixels: largest video frame (width * height) accepted.
        max_video_stream_frames: most frames a video stream may hold (header count, else duration x frame rate).
        max_video_frames: most video frames a request may bring (frames sampled per video times videos).
        max_media_parts: most image/audio/video parts in one request.
        max_prompt_tokens: largest prompt (text and media tokens), counted before the model runs; text longer than
            `MAX_CHARS_PER_TOKEN` characters per allowed token is refused before tokenizing.
        max_tokens: largest `max_tokens` / `max_completion_tokens` a request may ask for.
        default_max_tokens: used when a request gives neither.
        max_concurrent: generations running at once, decoded together in one batch (`omniola.generation.Engine`):
            decoding on a CPU is bound by memory, so a batch of 8 costs little more per step than one request.
        max_waiting: requests admitted beyond those, fetching or decoding media or waiting for a slot; beyond
            `max_concurrent + max_waiting` a request gets 429 before any of its media is fetched or decoded.
        media_workers: threads that decode media (apart from those that tokenize text requests).
        retry_after_s: the `Retry-After` header of a 429.
        allow_remote_media: fetch `http(s)://` image/video URLs (off: only data URLs and allowed paths); only public
            addresses, each redirect checked (see `server/remote.py`).
        remote_media_domains: if not empty, the only domains (and their subdomains) remote media may come from.
        remote_timeout_s: deadline of one remote media fetch, redirects and body included.
        body_timeout_s: deadline for reading a request's body (a client that sends it slower gets 408).
        header_timeout_s: deadline for a connection to send its request headers (then it is closed); applies when
            the server runs through `omniola serve` (`server.app.run`).
        allowed_hosts: without API keys, the `Host` names accepted besides IP addresses and `localhost` (DNS
            rebinding protection); with keys, any.
        video_dir: local directory whose files a `video` part may name by path (`None`: no local paths).
        speech_backend: factory of the voice used for `modalities: ["text", "audio"]` (`None`: Piper, on first use).
        warmup: run one tiny generation at startup so the first request does not pay one-time costs.
    """

    model_name: str = "omniola"
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_aspect_ratio: float = 200.0
    max_audio_seconds: float = 120.0
    max_video_seconds: float = 600.0
    max_video_pixels: int = 3840 * 2160
    max_video_stream_frames: int = 36_000  # 10 minutes at 60 fps
    max_video_frames: int = 64
    max_media_parts: int = 8
    max_prompt_tokens: int = 16_384
    max_tokens: int = 2048
    default_max_tokens: int = 256
    max_concurrent: int = 8
    max_waiting: int = 8
    media_workers: int = 2
    retry_after_s: int = 1
    allow_remote_media: bool = False
    remote_media_domains: tuple[str, ...] = ()
    remote_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    allowed_hosts: tuple[str, ...] = ()
    video_dir: Path | None = None
    speech_backend: Callable[[], SpeechBackend] | None = None
    warmup: bool = True

    def __post_init__(self):
        for name in ("max_body_bytes", "max_image_pixels", "max_video_pixels", "max_video_stream_frames",
                     "max_video_frames", "max_media_parts", "max_prompt_tokens", "max_tokens", "default_max_tokens",
                     "max_concurrent", "media_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"server setting {name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_audio_seconds", "max_video_seconds", "remote_timeout_s", "body_timeout_s",
                     "header_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"server setting {name} must be > 0, got {getattr(self, name)}")
        if self.max_waiting < 0:
            raise ConfigError(f"server setting max_waiting must be >= 0, got {self.max_waiting}")
        if self.max_aspect_ratio < 1:
            raise ConfigError(f"server setting max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")
        if self.default_max_tokens > self.max_tokens:
            raise ConfigError(f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens ({self.max_tokens})")
        if self.video_dir is not None:
            self.video_dir = Path(self.video_dir).expanduser().resolve()
            if not self.video_dir.is_dir():
                raise ConfigError(f"--video-dir {self.video_dir} is not a directory")
        self.api_keys = tuple(k for k in self.api_keys if k)
        self.allowed_hosts = tuple(h.lower() for h in self.allowed_hosts if h)
        self.remote_media_domains = tuple(d.lower() for d in self.remote_media_domains if d)

    def media_limits(self) -> MediaLimits:
        """The bounds media decoding checks before decoding (sample rates and channels: the library's)."""
        return MediaLimits(
            max_image_pixels=self.max_image_pixels, max_aspect_ratio=self.max_aspect_ratio,
            max_audio_seconds=self.max_audio_seconds, max_video_seconds=self.max_video_seconds,
            max_video_pixels=self.max_video_pixels, max_video_stream_frames=self.max_video_stream_frames,
        )

    @staticmethod
    def keys_from(flag: str | None) -> tuple[str, ...]:
        """The API keys from a flag (comma-separated), else from `$OMNIOLA_API_KEY`."""
        raw = flag or os.environ.get(API_KEY_ENV, "")
        return tuple(k.strip() for k in raw.split(",") if k.strip())
