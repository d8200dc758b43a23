"""FastAPI routes of the OpenAI-compatible server; the logic lives in `serving.py`, the limits in `settings.py`.

    omniola serve --model DIR --host 127.0.0.1 --port 8000

State (the engine, the settings) lives on `app.state`; nothing is kept between requests.
"""

from __future__ import annotations

import hmac
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import ModelCard, ModelList, now
from .serving import APIError, OlaServing, StreamResult
from .settings import ServerSettings


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


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
            app.state.serving = OlaServing(loaded_model, loaded_processor, settings)
        if settings.warmup:
            app.state.serving.warmup()
        yield

    app = FastAPI(title="omniola", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.started = now()
    app.state.serving = OlaServing(model, processor, settings) if model is not None else None

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
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        ok = scheme.lower() == "bearer" and any(hmac.compare_digest(given, k.encode()) for k in keys)
        if not ok:
            raise APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        limit = request.app.state.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise APIError(413, f"request body exceeds {limit} bytes", code="body_too_large")
        body = bytearray()
        async for block in request.stream():
            body += block
            if len(body) > limit:
                raise APIError(413, f"request body exceeds {limit} bytes", code="body_too_large")
        return bytes(body)

    @app.get("/health")
    async def health(request: Request):
        serving = request.app.state.serving
        return {"status": "ok", "running": serving.admission.running, "admitted": serving.admission.admitted}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        s = request.app.state.settings
        return ModelList(data=[ModelCard(id=s.model_name, created=request.app.state.started)]).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        result = await request.app.state.serving.create_chat_completion(await read_body(request))
        if isinstance(result, StreamResult):
            return StreamingResponse(result.body, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(result.close))
        return JSONResponse(result.model_dump(exclude_none=False))

    return app
