"""Text to speech over the installed voices (`omniola.voices`): OpenAI's `POST /v1/audio/speech`, and the voice list
`GET /v1/audio/voices` (an omniola extension).

`SpeechServing.create_speech(raw_body)` checks the request, loads the voice and speaks the first sentence before
answering, so that a bad voice or a failing engine is an HTTP error rather than a cut stream; the body then speaks
the rest sentence by sentence (`omniola.speech.split_sentences`), one sentence ahead of what the client has read.
Synthesis runs on a pool of `ServerSettings.max_concurrent` threads, never on the event loop; a client that leaves
stops the work at the next sentence.

Audio (`response_format`):

- `wav`: 16-bit mono at the voice's own rate (22050 Hz for Piper and espeak-ng). The header is sent before the
  length is known, so its size fields mark a stream of unknown length (as in streamed chat audio).
- `pcm`: raw 16-bit little-endian mono at 24 kHz, OpenAI's `pcm`, so clients that play OpenAI's PCM play omniola's
  unchanged (resampled with soxr, one stream per request, so sentences join without clicks).

Framing (`stream_format`): `audio` (default) sends the bytes themselves, chunk by chunk as sentences are spoken;
`sse` sends `text/event-stream` events `{"type": "speech.audio.delta", "audio": "<base64>"}` (the same bytes,
concatenated they are the file) then `{"type": "speech.audio.done", "usage": {...}}`, whose `input_tokens` counts
the input's characters (omniola's voices have no tokens) and `output_tokens` is 0.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import soxr

from ..errors import OmniolaError, VoiceNotFoundError
from ..speech import SpeechBackend, split_sentences, to_pcm16, wav_header
from ..voices import VoiceRegistry, synthesize
from .protocol import (
    SpeechAudioDelta,
    SpeechAudioDone,
    SpeechRequest,
    SpeechUsage,
    VoiceCard,
    VoiceList,
)
from .serving import APIError, bad_request, parse_request
from .settings import ServerSettings

MAX_INPUT_CHARS = 4096  # OpenAI's limit on `input`
PCM_SAMPLE_RATE = 24000  # OpenAI's `pcm`: 24 kHz, 16-bit little-endian, mono
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm"}
STREAM_FORMATS = ("audio", "sse")


@dataclass
class SpeechResult:
    """A speech response: its body (bytes, or server-sent event lines) and its media type."""

    body: AsyncIterator[bytes] | AsyncIterator[str]
    media_type: str


class _Encoder:
    """float32 chunks at `rate` -> the bytes of `fmt`: `wav` (a streamed header first, then PCM at `rate`) or `pcm`
    (PCM at 24 kHz). `encode(..., last=True)` ends the stream (the resampler's tail; an empty WAV's header)."""

    def __init__(self, fmt: str, rate: int):
        self.header = wav_header(rate) if fmt == "wav" else b""
        self.resampler = None
        if fmt == "pcm" and rate != PCM_SAMPLE_RATE:
            self.resampler = soxr.ResampleStream(rate, PCM_SAMPLE_RATE, 1, dtype="float32")

    def encode(self, audio: np.ndarray, last: bool = False) -> bytes:
        if self.resampler is not None:
            audio = self.resampler.resample_chunk(audio, last=last)
        data, self.header = self.header + to_pcm16(audio), b""
        return data


class SpeechServing:
    """Text to speech with the voices of a `VoiceRegistry`.

    Args:
        settings: the server's settings (`speech_backend`, if set, is the voice named `default`, listed first;
            `max_concurrent` sizes the synthesis pool).
        voices: the voices (default: `VoiceRegistry(default=settings.speech_backend)`).
    """

    def __init__(self, settings: ServerSettings, voices: VoiceRegistry | None = None):
        self.settings = settings
        self.voices = voices or VoiceRegistry(default=settings.speech_backend)
        self.pool = ThreadPoolExecutor(settings.max_concurrent, thread_name_prefix="omniola-speech")

    def list_voices(self) -> VoiceList:
        """The voices, the default first (runs `espeak-ng --voices` once: call it off the event loop)."""
        return VoiceList(data=[VoiceCard(id=v.name, engine=v.engine, language=v.language,
                                         description=v.description) for v in self.voices.voices()])

    @staticmethod
    def check(req: SpeechRequest) -> None:
        """Refuses what omniola cannot produce and inputs out of bounds. Raises `APIError` (400)."""
        if req.response_format not in MEDIA_TYPES:
            raise bad_request(f"response_format {req.response_format!r} is not supported; omniola produces "
                              f"{' or '.join(map(repr, MEDIA_TYPES))}", param="response_format",
                              code="unsupported_format")
        if req.stream_format not in STREAM_FORMATS:
            raise bad_request(f"stream_format {req.stream_format!r} is not supported; use "
                              f"{' or '.join(map(repr, STREAM_FORMATS))}", param="stream_format",
                              code="unsupported_format")
        if req.instructions:
            raise bad_request("instructions are not supported: omniola's voices cannot be directed (leave "
                              "instructions unset)", param="instructions", code="unsupported_parameter")
        if not req.input.strip():
            raise bad_request("input is empty: give the text to speak", param="input", code="empty_input")
        if len(req.input) > MAX_INPUT_CHARS:
            raise bad_request(f"input has {len(req.input)} characters; at most {MAX_INPUT_CHARS} are spoken per "
                              "request", param="input", code="input_too_long")

    async def create_speech(self, raw: bytes) -> SpeechResult:
        """Returns the streamed speech of a `POST /v1/audio/speech` body; raises `APIError` for a bad request, a
        voice that does not exist or cannot load, or a first sentence the engine fails to speak."""
        req = parse_request(SpeechRequest, raw)
        self.check(req)
        loop = asyncio.get_running_loop()
        try:
            backend = await loop.run_in_executor(self.pool, self.voices.backend, req.voice_name())
        except VoiceNotFoundError as err:
            raise bad_request(str(err), param="voice", code="voice_not_found") from None
        except OmniolaError as err:
            raise bad_request(f"voice {req.voice_name() or 'default'!r} is not available on this server: {err}",
                              param="voice", code="voice_unavailable") from None
        audio = self._speak(backend, split_sentences(req.input), req.speed)
        try:
            first = await anext(audio, None)
        except OmniolaError as err:
            raise APIError(500, f"speech synthesis failed: {err}", type="server_error") from None
        encoder = _Encoder(req.response_format, int(backend.sample_rate))
        data = self._encode(first, audio, encoder)
        if req.stream_format == "sse":
            return SpeechResult(self._events(data, SpeechUsage(input_tokens=len(req.input), output_tokens=0,
                                                               total_tokens=len(req.input))),
                                "text/event-stream")
        return SpeechResult(data, MEDIA_TYPES[req.response_format])

    async def _speak(self, backend: SpeechBackend, sentences: list[str], speed: float) -> AsyncIterator[np.ndarray]:
        """Each sentence's audio in order; the next sentence is spoken while this one is sent."""
        loop = asyncio.get_running_loop()
        todo: Iterator[str] = iter(sentences)

        def submit() -> asyncio.Future | None:
            sentence = next(todo, None)
            return None if sentence is None else loop.run_in_executor(self.pool, synthesize, backend, sentence, speed)

        pending = submit()
        try:
            while pending is not None:
                audio = await pending
                pending = submit()
                yield audio
        finally:
            if pending is not None:  # the client left: drop the sentence queued next (one running finishes)
                pending.cancel()

    @staticmethod
    async def _encode(first: np.ndarray | None, rest: AsyncIterator[np.ndarray],
                      encoder: _Encoder) -> AsyncIterator[bytes]:
        if first is not None:
            if data := encoder.encode(first):
                yield data
            async for audio in rest:
                if data := encoder.encode(audio):
                    yield data
        if data := encoder.encode(np.zeros(0, dtype=np.float32), last=True):
            yield data

    @staticmethod
    async def _events(data: AsyncIterator[bytes], usage: SpeechUsage) -> AsyncIterator[str]:
        try:
            async for chunk in data:
                yield _sse(SpeechAudioDelta(audio=base64.b64encode(chunk).decode()))
            yield _sse(SpeechAudioDone(usage=usage))
        except OmniolaError as err:  # the status line is sent already: report in the stream, then end it
            yield f"data: {json.dumps({'type': 'error', **APIError(500, str(err), type='server_error').body()})}\n\n"


def _sse(event) -> str:
    return f"data: {event.model_dump_json()}\n\n"
