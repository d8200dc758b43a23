"""Limits and switches of the OpenAI-compatible server; every knob is a field (and a `omniola serve` flag)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from ..speech import SpeechBackend

API_KEY_ENV = "OMNIOLA_API_KEY"


@dataclass
class ServerSettings:
    """What the server accepts and how much work it takes on.

    Attributes:
        model_name: the id reported by `GET /v1/models` and echoed in responses.
        api_keys: accepted `Authorization: Bearer` keys; empty means no authentication.
        max_body_bytes: largest request body (media arrive base64-encoded inside it).
        max_image_pixels: largest image (width * height) accepted, checked before decoding the pixels.
        max_audio_seconds: longest audio input accepted (longer is a 400, not a silent cut).
        max_video_frames: most video frames a request may bring (frames sampled per video times videos).
        max_media_parts: most image/audio/video parts in one request.
        max_tokens: largest `max_tokens` / `max_completion_tokens` a request may ask for.
        default_max_tokens: used when a request gives neither.
        max_concurrent: generations running at once.
        max_waiting: requests allowed to wait for a slot; beyond `max_concurrent + max_waiting` a request gets 429.
        retry_after_s: the `Retry-After` header of a 429.
        allow_remote_media: fetch `http(s)://` image/audio/video URLs (off: only data URLs and allowed paths).
        remote_timeout_s: timeout of one remote media fetch.
        video_dir: local directory whose files a `video` part may name by path (`None`: no local paths).
        speech_backend: factory of the voice used for `modalities: ["text", "audio"]` (`None`: Piper, on first use).
        warmup: run one tiny generation at startup so the first request does not pay one-time costs.
    """

    model_name: str = "omniola"
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_audio_seconds: float = 120.0
    max_video_frames: int = 64
    max_media_parts: int = 8
    max_tokens: int = 2048
    default_max_tokens: int = 256
    max_concurrent: int = 1
    max_waiting: int = 8
    retry_after_s: int = 1
    allow_remote_media: bool = False
    remote_timeout_s: float = 10.0
    video_dir: Path | None = None
    speech_backend: Callable[[], SpeechBackend] | None = None
    warmup: bool = True

    def __post_init__(self):
        for name in ("max_body_bytes", "max_image_pixels", "max_video_frames", "max_media_parts", "max_tokens",
                     "default_max_tokens", "max_concurrent"):
            if getattr(self, name) < 1:
                raise ConfigError(f"server setting {name} must be >= 1, got {getattr(self, name)}")
        if self.max_waiting < 0 or self.max_audio_seconds <= 0:
            raise ConfigError("server settings max_waiting must be >= 0 and max_audio_seconds > 0")
        if self.default_max_tokens > self.max_tokens:
            raise ConfigError(f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens ({self.max_tokens})")
        if self.video_dir is not None:
            self.video_dir = Path(self.video_dir).expanduser().resolve()
            if not self.video_dir.is_dir():
                raise ConfigError(f"--video-dir {self.video_dir} is not a directory")
        self.api_keys = tuple(k for k in self.api_keys if k)

    @staticmethod
    def keys_from(flag: str | None) -> tuple[str, ...]:
        """The API keys from a flag (comma-separated), else from `$OMNIOLA_API_KEY`."""
        raw = flag or os.environ.get(API_KEY_ENV, "")
        return tuple(k.strip() for k in raw.split(",") if k.strip())
