"""Pydantic models of the chat-completions and text-to-speech APIs, ordered as in OpenAI's API reference.

Only what omniola serves is modelled; unknown top-level fields are ignored (clients send many), but an unknown
content-part type is an error, and so is a parameter that asks for what omniola cannot do (tools, response_format,
logprobs, ...: `ChatCompletionRequest.unsupported`), as in OpenAI's and vLLM's servers. omniola's extensions are
fenced under their own comment.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ------------------------------------------------------------------------------------------------- request parts
class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageURL(_Model):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Model):
    data: str
    format: Literal["wav", "mp3", "flac", "ogg", "webm", "m4a"]


class AudioPart(_Model):
    type: Literal["input_audio"]
    input_audio: InputAudio


# --- omniola extension: video input -----------------------------------------------------------------------------
class VideoSource(_Model):
    """A video as a data URL (`data:video/mp4;base64,...`), an http(s) URL (when allowed), or a path under the
    server's `--video-dir`."""

    url: str | None = None
    path: str | None = None


class VideoPart(_Model):
    type: Literal["video"]
    video: VideoSource


class VideoURLPart(_Model):
    """vLLM's spelling of a video part, accepted too."""

    type: Literal["video_url"]
    video_url: VideoSource


# --- end of omniola extension -----------------------------------------------------------------------------------

ContentPart = Annotated[
    Union[TextPart, ImagePart, AudioPart, VideoPart, VideoURLPart], Field(discriminator="type")
]


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class AudioOutputParam(_Model):
    voice: str = "default"
    format: Literal["wav", "pcm16"] = "wav"


class StreamOptions(_Model):
    include_usage: bool = False


# ------------------------------------------------------------------------------------------------------ request
class ChatCompletionRequest(_Model):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    audio: AudioOutputParam | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    modalities: list[Literal["text", "audio"]] | None = None
    n: int = Field(default=1, ge=1, le=1)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension (benchmarks): answer exactly max_tokens tokens
    # --- in OpenAI's API, not honoured by omniola: setting them to anything but their neutral value is a 400
    frequency_penalty: Any = None
    function_call: Any = None
    functions: Any = None
    logit_bias: Any = None
    logprobs: Any = None
    prediction: Any = None
    presence_penalty: Any = None
    response_format: Any = None
    tool_choice: Any = None
    tools: Any = None
    top_logprobs: Any = None

    def unsupported(self) -> str | None:
        """The first parameter set to something omniola cannot honour, or `None`."""
        neutral = {
            "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "logprobs": (None, False),
            "top_logprobs": (None, 0), "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
            "tool_choice": (None, "none"), "function_call": (None, "none"), "prediction": (None,),
        }
        for name, values in neutral.items():
            value = getattr(self, name)
            if not any(value == v and type(value) is type(v) for v in values):
                return name
        if self.response_format not in (None, {"type": "text"}):
            return "response_format"
        return None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


# ----------------------------------------------------------------------------------------------------- response
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AudioOutput(_Model):
    id: str
    data: str
    transcript: str
    expires_at: int


class ResponseMessage(_Model):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    audio: AudioOutput | None = None


class Choice(_Model):
    index: int = 0
    message: ResponseMessage
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: Any = None


class ChatCompletion(_Model):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaAudio(_Model):
    id: str
    data: str | None = None
    transcript: str | None = None
    expires_at: int | None = None


class Delta(_Model):
    role: Literal["assistant"] | None = None
    content: str | None = None
    audio: DeltaAudio | None = None


class ChunkChoice(_Model):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: Any = None


class ChatCompletionChunk(_Model):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(_Model):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "omniola"


class ModelList(_Model):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(_Model):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Model):
    error: ErrorInfo


# ------------------------------------------------------------------------------------------------ text to speech
class VoiceID(_Model):
    id: str


class SpeechRequest(_Model):
    """`POST /v1/audio/speech`. `response_format` and `stream_format` are plain strings here so that the server can
    refuse what it does not produce (`mp3`, ...) naming what it does; `speed` is OpenAI's range."""

    input: str
    model: str | None = None
    voice: str | VoiceID | None = None
    instructions: str | None = None
    response_format: str = "wav"  # OpenAI's default, mp3, is not produced by omniola
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    stream_format: str = "audio"

    def voice_name(self) -> str | None:
        return self.voice.id if isinstance(self.voice, VoiceID) else self.voice


class SpeechUsage(_Model):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class SpeechAudioDelta(_Model):
    type: Literal["speech.audio.delta"] = "speech.audio.delta"
    audio: str


class SpeechAudioDone(_Model):
    type: Literal["speech.audio.done"] = "speech.audio.done"
    usage: SpeechUsage


# --- omniola extension: the voice list (GET /v1/audio/voices) --------------------------------------------------
class VoiceCard(_Model):
    id: str
    object: Literal["voice"] = "voice"
    engine: str
    language: str
    description: str


class VoiceList(_Model):
    object: Literal["list"] = "list"
    data: list[VoiceCard]


# --- end of omniola extension -----------------------------------------------------------------------------------
