"""Chat completions over an injected engine (a loaded model and its processor).

`OlaServing.create_chat_completion(raw_body)` returns a `ChatCompletion` or a `StreamResult` (server-sent
event lines) and raises `APIError` for bad requests; the routes in `app.py` only turn these into HTTP responses.

A request's life: parse and check what is cheap to check (parameters, counts, text length); take an admission slot
or answer 429; fetch remote media (async, one deadline per fetch); decode the media in a bounded pool of its own
(limits read from headers first, see `omniola.media.MediaLimits`); count the prompt's tokens; wait for a generation
slot; generate. So no media are fetched or decoded for a request the server will refuse, and text requests never
queue behind media decoding.

Every request is independent (no session state), so replicas behind a load balancer need nothing shared.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ValidationError

from ..errors import MediaError, MediaLimitError, OmniolaError, VoiceNotFoundError
from ..generation import Done, Engine, GenerationOptions, SpeechDelta, TextDelta
from ..media import VideoClip, load_audio, load_image
from ..speech import SpeechBackend, to_pcm16, wav_header
from ..voices import VoiceRegistry
from .protocol import (
    AudioOutput,
    AudioPart,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    DeltaAudio,
    ErrorInfo,
    ErrorResponse,
    ImagePart,
    ResponseMessage,
    TextPart,
    Usage,
    VideoPart,
    completion_id,
    now,
)
from .remote import FetchRefused, RemoteMediaFetcher
from .settings import MAX_CHARS_PER_TOKEN, ServerSettings

AUDIO_TTL_S = 3600  # `expires_at` of returned audio; the server keeps nothing, so this is only informative
MEDIA_NICE = 10  # media decoding threads run at this nice value: text requests and generation come first


def _lower_thread_priority() -> None:
    """Lowers the calling thread's CPU priority (Linux: a thread is a task with its own nice value, which the
    decoder threads it starts inherit), so that decoding media yields the cores to generation and text requests."""
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, max(os.getpriority(os.PRIO_PROCESS, thread), MEDIA_NICE))
    except (AttributeError, OSError):  # not Linux, or not permitted: decoding keeps the normal priority
        pass


@dataclass
class APIError(Exception):
    """An error to send as OpenAI's error JSON with an HTTP status."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def parse_request(model: type[BaseModel], body: bytes):
    """Body bytes -> a validated `model`, or an `APIError` (400) naming the first bad field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()))
        if first.get("type") == "json_invalid":
            raise bad_request(f"the body is not valid JSON: {first.get('msg')}", code="invalid_json") from None
        raise bad_request(f"{loc or 'body'}: {first.get('msg')}", param=loc or None) from None


class Admission:
    """At most `max_concurrent + max_waiting` requests admitted at once, of which `max_concurrent` generate; the
    others fetch or decode their media, or wait for a generation slot. Beyond that, refuse (429).

    A request is admitted before any of its media is fetched or decoded, so the count (and `/health`) includes
    requests that are still decoding. Used from the event loop only.
    """

    def __init__(self, max_concurrent: int, max_waiting: int):
        self.max_concurrent, self.max_waiting = max_concurrent, max_waiting
        self.semaphore = asyncio.Semaphore(max_concurrent)
        self.admitted = 0  # decoding + waiting + running
        self.decoding = 0  # fetching or decoding media
        self.running = 0  # generating

    @property
    def full(self) -> bool:
        return self.admitted >= self.max_concurrent + self.max_waiting

    def admit(self) -> Ticket | None:
        """A ticket for one request, or `None` if the server is full."""
        if self.full:
            return None
        self.admitted += 1
        return Ticket(self)


class Ticket:
    """One admitted request: `start()` waits for a generation slot; `release()` (idempotent) gives back all."""

    def __init__(self, admission: Admission):
        self.admission, self.started, self.released = admission, False, False

    async def start(self) -> None:
        await self.admission.semaphore.acquire()
        self.started = True
        self.admission.running += 1

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.admission.admitted -= 1
        if self.started:
            self.admission.running -= 1
            self.admission.semaphore.release()


def _sse(obj) -> str:
    return f"data: {obj.model_dump_json(exclude_none=True)}\n\n"


class OlaServing:
    """Chat completions with one loaded model.

    Args:
        model: a loaded `OlaForConditionalGeneration` (eval mode).
        processor: its `OlaProcessor`.
        settings: limits and switches.
        fetcher: fetches remote media (default: one built from `settings`).
        voices: the voices of spoken answers (default: `VoiceRegistry(default=settings.speech_backend)`).
    """

    def __init__(self, model, processor, settings: ServerSettings, *, fetcher: RemoteMediaFetcher | None = None,
                 voices: VoiceRegistry | None = None):
        self.model, self.processor, self.settings = model, processor, settings
        self.limits = settings.media_limits()
        self.admission = Admission(settings.max_concurrent, settings.max_waiting)
        self.engine = Engine(model, processor, max_batch=settings.max_concurrent)  # admitted requests decode together
        # media are fetched on the event loop and decoded here, never on the threads that tokenize text requests
        self.media_pool = ThreadPoolExecutor(settings.media_workers, thread_name_prefix="omniola-media",
                                             initializer=_lower_thread_priority)
        self.fetcher = fetcher or RemoteMediaFetcher(settings.remote_timeout_s, settings.max_body_bytes,
                                                     settings.remote_media_domains)
        self.voices = voices or VoiceRegistry(default=settings.speech_backend)

    # ---------------------------------------------------------------------------------------------- lifecycle
    def warmup(self) -> None:
        """Pays first-request costs (allocations, kernels) with a one-token generation."""
        inputs = self.processor.apply_chat_template([{"role": "user", "content": "hi"}])
        self.engine.generate(inputs, GenerationOptions(max_new_tokens=1))
        try:  # load the default voice now rather than in the first spoken answer
            self.voices.backend(None).synthesize("Hello.")
        except OmniolaError:  # no voice installed: spoken answers will fail with a clear error instead
            pass

    def voice(self, req: ChatCompletionRequest) -> SpeechBackend | None:
        """The loaded voice of a request that asks for spoken answers (`audio.voice`), else `None`. Raises `APIError`."""
        if "audio" not in (req.modalities or []):
            return None
        name = req.audio.voice if req.audio else None
        try:
            return self.voices.backend(name)
        except VoiceNotFoundError as err:
            raise bad_request(str(err), param="audio.voice", code="voice_not_found") from None
        except OmniolaError as err:
            raise bad_request(f"spoken answers are not available on this server: {err}", param="modalities",
                              code="audio_unavailable") from None

    # ---------------------------------------------------------------------------------------------- requests
    def parse(self, body: bytes) -> ChatCompletionRequest:
        """Body bytes -> validated request, or an `APIError` (400) naming the field."""
        if len(body) > self.settings.max_body_bytes:
            raise APIError(413, f"request body exceeds {self.settings.max_body_bytes} bytes", code="body_too_large")
        return parse_request(ChatCompletionRequest, body)

    def check(self, req: ChatCompletionRequest) -> None:
        """What can be refused before admission, without fetching or decoding anything. Raises `APIError`."""
        unsupported = req.unsupported()
        if unsupported:
            raise bad_request(f"{unsupported} is not supported by this server (omniola generates plain text; "
                              f"leave {unsupported} unset)", param=unsupported, code="unsupported_parameter")
        self._max_new_tokens(req)
        if req.audio is not None and "audio" not in (req.modalities or []):
            raise bad_request("audio output parameters given but modalities does not include 'audio'", param="audio")
        n_media, n_chars, n_frames = 0, 0, 0
        for m_idx, message in enumerate(req.messages):
            if isinstance(message.content, str):
                n_chars += len(message.content)
                continue
            for p_idx, part in enumerate(message.content or []):
                param = f"messages.{m_idx}.content.{p_idx}"
                if isinstance(part, TextPart):
                    n_chars += len(part.text)
                    continue
                n_media += 1
                if n_media > self.settings.max_media_parts:
                    raise bad_request(f"more than {self.settings.max_media_parts} media parts", param=param)
                if message.role != "user":
                    raise bad_request(f"media parts are only accepted in user messages, not {message.role}",
                                      param=param)
                source = part.video if isinstance(part, VideoPart) else getattr(part, "video_url", None)
                if source is not None:
                    if (source.url is None) == (source.path is None):
                        raise bad_request("a video part needs exactly one of url or path", param=param)
                    n_frames += self.processor.settings.video_num_frames  # at most, sampled from each video
                    if n_frames > self.settings.max_video_frames:
                        raise bad_request(f"the videos would bring more than {self.settings.max_video_frames} "
                                          f"frames ({self.processor.settings.video_num_frames} per video)",
                                          param=param)
        max_chars = self.settings.max_prompt_tokens * MAX_CHARS_PER_TOKEN
        if n_chars > max_chars:  # refused before tokenizing: tokenizing megabytes costs seconds and gigabytes
            raise bad_request(f"the messages hold {n_chars} characters of text, above this server's limit of "
                              f"{max_chars} ({MAX_CHARS_PER_TOKEN} per prompt token allowed)", param="messages",
                              code="prompt_too_long")

    def _max_new_tokens(self, req: ChatCompletionRequest) -> int:
        asked = req.max_completion_tokens or req.max_tokens
        if asked is None:
            return self.settings.default_max_tokens
        if asked > self.settings.max_tokens:
            name = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise bad_request(f"{name} is {asked}, above this server's limit of {self.settings.max_tokens}",
                              param=name)
        return asked

    def to_messages(self, req: ChatCompletionRequest, fetched: dict[str, bytes] | None = None) -> list[dict]:
        """OpenAI messages -> processor messages with decoded media (raises `APIError` for bad media).

        `fetched`: the bodies of remote media URLs, by part (`fetch_remote`); everything else comes from the request.
        """
        fetched = fetched or {}
        messages, n_frames = [], 0
        for m_idx, message in enumerate(req.messages):
            role = "system" if message.role == "developer" else message.role
            content = message.content
            if content is None or isinstance(content, str):
                messages.append({"role": role, "content": content or ""})
                continue
            parts = []
            for p_idx, part in enumerate(content):
                param = f"messages.{m_idx}.content.{p_idx}"
                if isinstance(part, TextPart):
                    parts.append({"type": "text", "text": part.text})
                    continue
                if isinstance(part, ImagePart):
                    parts.append({"type": "image", "image": self._image(part.image_url.url, param, fetched)})
                elif isinstance(part, AudioPart):
                    audio = self._audio(part.input_audio.data, part.input_audio.format, param)
                    parts.append({"type": "audio", "audio": audio})
                else:
                    clip = self._video(part.video if isinstance(part, VideoPart) else part.video_url, param,
                                       fetched)
                    n_frames += len(clip.frames)
                    if n_frames > self.settings.max_video_frames:
                        raise bad_request(f"the videos bring more than {self.settings.max_video_frames} frames",
                                          param=param)
                    parts.append({"type": "video", "video": clip})
            messages.append({"role": role, "content": parts})
        return messages

    # media ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _media_urls(req: ChatCompletionRequest) -> Iterator[tuple[str, str]]:
        """`(param, url)` of every image and video part given by URL."""
        for m_idx, message in enumerate(req.messages):
            for p_idx, part in enumerate(message.content if isinstance(message.content, list) else []):
                param = f"messages.{m_idx}.content.{p_idx}"
                if isinstance(part, ImagePart):
                    yield param, part.image_url.url
                elif not isinstance(part, (TextPart, AudioPart)):
                    source = part.video if isinstance(part, VideoPart) else part.video_url
                    if source.url is not None:
                        yield param, source.url

    @staticmethod
    def has_media(req: ChatCompletionRequest) -> bool:
        return any(not isinstance(part, TextPart) for m in req.messages if isinstance(m.content, list)
                   for part in m.content)

    async def fetch_remote(self, req: ChatCompletionRequest) -> dict[str, bytes]:
        """Fetches the request's http(s) media URLs (each under `remote_timeout_s`); other URLs are checked only."""
        fetched = {}
        for param, url in self._media_urls(req):
            if url.startswith("data:"):
                continue
            if not url.startswith(("http://", "https://")):
                raise bad_request("media URLs must be data: URLs (or http(s) when enabled)", param=param)
            if not self.settings.allow_remote_media:
                raise bad_request("http(s) media URLs are disabled on this server (start it with "
                                  "--allow-remote-media); send a data URL instead", param=param, code="url_disabled")
            try:
                fetched[param] = await self.fetcher.fetch(url)
            except FetchRefused as err:
                raise bad_request(str(err), param=param, code="remote_media_refused") from None
        return fetched

    def _data(self, url: str, param: str, fetched: dict[str, bytes]) -> bytes:
        if param in fetched:
            return fetched[param]
        header, sep, payload = url.partition(",")
        if not url.startswith("data:") or not sep or not header.endswith(";base64"):
            raise bad_request("a data URL must look like data:<mime>;base64,<data>", param=param)
        return _b64(payload, param)

    def _image(self, url: str, param: str, fetched: dict[str, bytes]):
        data = self._data(url, param, fetched)
        try:
            return load_image(data, limits=self.limits)
        except MediaLimitError as err:
            raise bad_request(str(err), param=param, code="image_too_large") from None
        except MediaError as err:
            raise bad_request(f"the image could not be decoded: {err}", param=param, code="invalid_image") from None
        except Exception:  # noqa: BLE001 - a decoder's own error type; its text may hold internals
            raise bad_request("the image could not be decoded", param=param, code="invalid_image") from None

    def _audio(self, b64: str, fmt: str, param: str) -> np.ndarray:
        data = _b64(b64, param)
        try:
            return load_audio(data, sampling_rate=16000, limits=self.limits)
        except MediaLimitError as err:
            raise bad_request(str(err), param=param, code="audio_too_long") from None
        except MediaError as err:
            raise bad_request(f"the {fmt} audio could not be decoded: {err}", param=param,
                              code="invalid_audio") from None
        except Exception:  # noqa: BLE001 - a decoder's own error type; its text may hold internals
            raise bad_request(f"the {fmt} audio could not be decoded", param=param, code="invalid_audio") from None

    def _video(self, source, param: str, fetched: dict[str, bytes]) -> VideoClip:
        shown = None  # (server path, what the client wrote): error texts show the latter
        try:
            if source.path is not None:
                if self.settings.video_dir is None:
                    raise bad_request("local video paths are disabled on this server (start it with --video-dir)",
                                      param=param, code="path_disabled")
                path = (self.settings.video_dir / source.path).resolve()
                if not path.is_relative_to(self.settings.video_dir) or not path.is_file():
                    raise bad_request(f"{source.path} is not a file under the allowed video directory", param=param)
                shown = (str(path), source.path)
                return self.processor.load_video(str(path), limits=self.limits)
            return self.processor.load_video(self._data(source.url, param, fetched), limits=self.limits)
        except OmniolaError as err:
            message = str(err) if shown is None else str(err).replace(*shown)
            if isinstance(err, MediaLimitError):
                raise bad_request(message, param=param, code="video_too_large") from None
            raise bad_request(f"the video could not be decoded: {message}", param=param,
                              code="invalid_video") from None
        except APIError:
            raise
        except Exception:  # noqa: BLE001 - a decoder's own error type; its text may hold internals
            raise bad_request("the video could not be decoded", param=param, code="invalid_video") from None

    # generation ---------------------------------------------------------------------------------------------
    def prepare(self, req: ChatCompletionRequest, fetched: dict[str, bytes] | None = None):
        """Decodes the media and encodes the request: (inputs, generate options). Raises `APIError`."""
        max_new_tokens = self._max_new_tokens(req)
        try:
            inputs = self.processor.apply_chat_template(self.to_messages(req, fetched))
        except APIError:
            raise
        except MediaLimitError as err:
            raise bad_request(str(err), param="messages", code="media_too_large") from None
        except OmniolaError as err:
            raise bad_request(str(err), param="messages") from None
        n_prompt = int(inputs["input_ids"].shape[1])
        if n_prompt > self.settings.max_prompt_tokens:
            raise bad_request(f"the prompt is {n_prompt} tokens, above this server's limit of "
                              f"{self.settings.max_prompt_tokens}", param="messages", code="prompt_too_long")
        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        if limit and n_prompt + max_new_tokens > limit:
            raise bad_request(f"the prompt ({n_prompt} tokens) plus max tokens ({max_new_tokens}) exceeds the "
                              f"model's context of {limit} tokens", param="messages", code="context_length_exceeded")
        options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=req.temperature or 0.0,
                                    top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed,
                                    stop=tuple(req.stop_list()), ignore_eos=req.ignore_eos)
        return inputs, options

    def _busy(self) -> APIError:
        return APIError(429, "the server is busy: too many requests are running or waiting; retry shortly",
                        type="rate_limit_exceeded", code="server_busy",
                        headers={"Retry-After": str(self.settings.retry_after_s)})

    async def _decode(self, req: ChatCompletionRequest):
        """Fetches and decodes the media (in the media pool, counted as decoding) and encodes the request."""
        loop = asyncio.get_running_loop()
        if not self.has_media(req):
            return await loop.run_in_executor(None, self.prepare, req)
        admission = self.admission
        admission.decoding += 1
        counted = True

        def done() -> None:
            admission.decoding -= 1

        def job():
            try:
                return self.prepare(req, fetched)
            finally:
                loop.call_soon_threadsafe(done)  # the count follows the work, even if the client went away

        try:
            fetched = await self.fetch_remote(req)
            work = self.media_pool.submit(job)
            counted = False  # from here the job gives the count back; or this callback, if it never runs
            work.add_done_callback(lambda f: f.cancelled() and loop.call_soon_threadsafe(done))
            return await asyncio.wrap_future(work)
        finally:
            if counted:
                done()

    async def create_chat_completion(self, raw: bytes):
        """Returns a `ChatCompletion` or a `StreamResult`; raises `APIError` for bad input or a full queue."""
        req = self.parse(raw)
        self.check(req)
        ticket = self.admission.admit()  # before any media is fetched or decoded
        if ticket is None:
            raise self._busy()
        try:
            inputs, options = await self._decode(req)
            voice = await asyncio.get_running_loop().run_in_executor(None, self.voice, req)
            await ticket.start()
        except BaseException:
            ticket.release()
            raise
        meta = dict(id=completion_id(), created=now(), model=self.settings.model_name)
        if req.stream:
            return StreamResult(self._stream(req, inputs, options, meta, voice, ticket.release), ticket.release)
        try:
            return await self._complete(req, inputs, options, meta, voice)
        finally:
            ticket.release()

    async def _complete(self, req, inputs, options, meta, voice) -> ChatCompletion:
        request = self.engine.submit(inputs, options, voice=voice, loop=asyncio.get_running_loop())
        samples, done = [], None
        async for event in request.aevents():  # leaving early (client gone: this task cancelled) cancels it
            if isinstance(event, SpeechDelta):
                samples.append(event.audio)
            elif isinstance(event, Done):
                done = event
        message = ResponseMessage(content=done.text)
        if voice is not None:
            audio = np.concatenate(samples) if samples else np.zeros(0, np.float32)
            pcm = to_pcm16(audio)
            fmt = req.audio.format if req.audio else "wav"
            rate = int(voice.sample_rate)
            data = (wav_header(rate, len(pcm)) + pcm) if fmt == "wav" else pcm
            message = ResponseMessage(content=None, audio=AudioOutput(
                id=f"audio_{uuid.uuid4().hex}", data=base64.b64encode(data).decode(), transcript=done.text,
                expires_at=now() + AUDIO_TTL_S))
        return ChatCompletion(**meta, choices=[Choice(message=message, finish_reason=done.finish_reason)],
                              usage=_usage(done))

    async def _stream(self, req, inputs, options, meta, voice, release) -> AsyncIterator[str]:
        request = None
        wants_audio = voice is not None
        try:
            request = self.engine.submit(inputs, options, voice=voice, loop=asyncio.get_running_loop())
            audio_id = f"audio_{uuid.uuid4().hex}"
            fmt = req.audio.format if req.audio else "wav"
            rate = int(voice.sample_rate) if wants_audio else 0
            first_audio = True

            def chunk(delta: Delta | None, finish=None, usage=None) -> str:
                choices = [ChunkChoice(delta=delta, finish_reason=finish)] if delta is not None else []
                return _sse(ChatCompletionChunk(**meta, choices=choices, usage=usage))

            def audio_chunk(pcm: bytes) -> str:
                return chunk(Delta(audio=DeltaAudio(id=audio_id, data=base64.b64encode(pcm).decode(),
                                                    expires_at=now() + AUDIO_TTL_S)))

            yield chunk(Delta(role="assistant", content="" if not wants_audio else None))
            async for event in request.aevents():
                if isinstance(event, TextDelta):
                    delta = Delta(audio=DeltaAudio(id=audio_id, transcript=event.text)) if wants_audio \
                        else Delta(content=event.text)
                    yield chunk(delta)
                elif isinstance(event, SpeechDelta):
                    pcm = to_pcm16(event.audio)
                    if first_audio and fmt == "wav":
                        pcm = wav_header(rate) + pcm  # streamed WAV: length unknown in the header
                    first_audio = False
                    if pcm:
                        yield audio_chunk(pcm)
                else:
                    if wants_audio and first_audio and fmt == "wav":  # no speech at all: still a valid (empty) WAV
                        yield audio_chunk(wav_header(rate))
                    yield chunk(Delta(), finish=event.finish_reason)
                    if req.stream_options and req.stream_options.include_usage:
                        yield chunk(None, usage=_usage(event))
            yield "data: [DONE]\n\n"
        except OmniolaError as err:  # surfaced mid-stream: send it as an error event, then end the stream
            yield f"data: {json.dumps(APIError(400, str(err)).body())}\n\n"
        except Exception as err:  # noqa: BLE001 - the status line is sent already; report in the stream
            yield f"data: {json.dumps(APIError(500, str(err), type='server_error').body())}\n\n"
        finally:
            if request is not None:
                request.cancel()  # no-op when finished; frees the batch slot at once when the client went away
            release()


@dataclass
class StreamResult:
    """A streamed answer: server-sent event lines, and `close` to free its slot if the body is never read."""

    body: AsyncIterator[str]
    close: callable


def _usage(done: Done) -> Usage:
    return Usage(prompt_tokens=done.usage.prompt_tokens, completion_tokens=done.usage.completion_tokens,
                 total_tokens=done.usage.total_tokens)


def _b64(payload: str, param: str) -> bytes:
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("the media data is not valid base64", param=param, code="invalid_base64") from None
