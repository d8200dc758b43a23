"""FastAPI routes of the OpenAI-compatible server; the logic lives in `serving.py`, the limits in `settings.py`.

    omniola serve --model DIR --host 127.0.0.1 --port 8000

State (the engine, the settings) lives on `app.state`; nothing is kept between requests. Every response carries an
`X-Request-Id` (the client's, if it sent a sane one). Without API keys, requests a web page could send cross-site
are refused (see `guard_cross_site`).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import re
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..voices import VoiceRegistry
from .protocol import ModelCard, ModelList, now
from .serving import APIError, OlaServing, StreamResult
from .settings import ServerSettings
from .speech_api import SpeechServing


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
DISCONNECT_POLL_S = 0.25  # how often a non-streamed generation checks that its client is still there


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class RequestIdMiddleware:
    """Adds `X-Request-Id` to every response: the request's own header if it is short and plain, else a new id."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = (given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex).encode()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def _host_name(value: str) -> str:
    """`Host` / `Origin` authority -> the bare, lower-case host name (no port, no brackets)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.rpartition(":")[0] if value.count(":") == 1 else value


def guard_cross_site(request: Request, settings: ServerSettings) -> None:
    """Without API keys, refuses what a web page could make a browser send to this server.

    - `Host` must be an IP address, `localhost` or one of `allowed_hosts` (a page on evil.example whose name now
      resolves to 127.0.0.1 sends `Host: evil.example`: DNS rebinding);
    - an `Origin` header, if present, must name this same host (browsers send it on cross-site POSTs);
    - a POST must say `Content-Type: application/json`, which a page can send cross-site only after a CORS
      preflight that this server never approves (a `text/plain` form post would need none).
    """
    if settings.api_keys:
        return
    host = _host_name(request.headers.get("host", ""))
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost" and host not in settings.allowed_hosts:
            raise APIError(403, "this Host is not served without an API key (start the server with --allowed-host "
                                "NAME or --api-key)", type="permission_error", code="host_not_allowed") from None
    origin = request.headers.get("origin")
    if origin is not None:
        scheme, sep, authority = origin.partition("://")
        if origin == "null" or not sep or authority.lower() != request.headers.get("host", "").lower():
            raise APIError(403, "cross-site requests are refused on a server without an API key",
                           type="permission_error", code="cross_site_refused")
    if request.method == "POST":
        content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if content_type != "application/json":
            raise APIError(415, "send the body as JSON with 'Content-Type: application/json'",
                           code="unsupported_media_type")


def create_app(settings: ServerSettings, model=None, processor=None, *, model_dir=None) -> FastAPI:
    """Builds the app around a loaded model (or loads `model_dir` at startup).

    Args:
        settings: limits and switches.
        model, processor: an already loaded engine (tests, embedding); else `model_dir` is loaded at startup.
        model_dir: an omniola model directory.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.serving is None:
            from ..inference import load_model

            loaded_model, loaded_processor = load_model(model_dir)
            app.state.serving = OlaServing(loaded_model, loaded_processor, settings, voices=voices)
        if settings.warmup:
            app.state.serving.warmup()
        yield
        app.state.serving.engine.close()

    app = FastAPI(title="omniola", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(RequestIdMiddleware)
    app.state.settings = settings
    app.state.started = now()
    voices = VoiceRegistry(default=settings.speech_backend)  # one set of voices for chat and text to speech
    app.state.serving = OlaServing(model, processor, settings, voices=voices) if model is not None else None
    app.state.speech = SpeechServing(settings, voices)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(APIError(err.status_code, str(err.detail), type=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        return error_response(APIError(400, str(err.errors()[:1])))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception):
        return error_response(APIError(500, f"internal error: {type(err).__name__}", type="server_error"))

    def authorize(request: Request) -> None:
        keys = request.app.state.settings.api_keys
        if not keys:
            guard_cross_site(request, request.app.state.settings)
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        ok = scheme.lower() == "bearer" and any(hmac.compare_digest(given, k.encode()) for k in keys)
        if not ok:
            raise APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        settings = request.app.state.settings
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise APIError(413, f"request body exceeds {limit} bytes", code="body_too_large")
        body = bytearray()
        try:
            async with asyncio.timeout(settings.body_timeout_s):  # one deadline for the whole body
                async for block in request.stream():
                    body += block
                    if len(body) > limit:
                        raise APIError(413, f"request body exceeds {limit} bytes", code="body_too_large")
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {settings.body_timeout_s:g} s",
                           code="body_timeout", headers={"Connection": "close"}) from None
        return bytes(body)

    @app.get("/health")
    async def health(request: Request):
        admission = request.app.state.serving.admission
        return {"status": "ok", "running": admission.running, "admitted": admission.admitted,
                "decoding": admission.decoding}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        s = request.app.state.settings
        return ModelList(data=[ModelCard(id=s.model_name, created=request.app.state.started)]).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = await read_body(request)
        work = asyncio.ensure_future(request.app.state.serving.create_chat_completion(body))
        while not work.done():  # a client that leaves stops its work: decoding, waiting and generation
            await asyncio.wait({work}, timeout=DISCONNECT_POLL_S)
            if not work.done() and await request.is_disconnected():
                work.cancel()
                try:
                    await work
                except asyncio.CancelledError:
                    pass
                return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"
        result = work.result()
        if isinstance(result, StreamResult):
            return StreamingResponse(result.body, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(result.close))
        return JSONResponse(result.model_dump(exclude_none=False))

    @app.get("/v1/audio/voices")
    async def audio_voices(request: Request):
        authorize(request)
        voices = await asyncio.get_running_loop().run_in_executor(None, request.app.state.speech.list_voices)
        return voices.model_dump()

    @app.post("/v1/audio/speech")
    async def audio_speech(request: Request):
        authorize(request)
        body = await read_body(request)
        result = await request.app.state.speech.create_speech(body)
        return StreamingResponse(result.body, media_type=result.media_type,
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def server_config(app: FastAPI, host: str, port: int, **kwargs):
    """A `uvicorn.Config` for `app` whose connections must send their request headers within the app's
    `header_timeout_s` (uvicorn alone waits for slow headers forever: its keep-alive timer restarts on every byte)."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    timeout = app.state.settings.header_timeout_s

    class HeaderDeadlineProtocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_deadline()  # the next request on this connection gets its own deadline

        def _arm_header_deadline(self) -> None:
            waiting_for = self.cycle  # a new request replaces the cycle once its headers are complete
            self.loop.call_later(timeout, lambda: self.cycle is waiting_for and self.transport.close())

    return uvicorn.Config(app, host=host, port=port, http=HeaderDeadlineProtocol, **kwargs)
