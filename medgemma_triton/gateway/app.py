"""The HTTP routes: POST /v1/chat/completions, GET /v1/models, GET /health.

One AsyncMedGemmaClient (one gRPC channel, created in the server's event loop at startup) carries
every request; each request is one gRPC stream on it. The server's refusals arrive before any token,
so a streamed request waits for its first text before it sends the HTTP status: a refused request gets
a 400 with OpenAI's error body, not a 200 whose stream then fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import PurePosixPath

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from medgemma_triton.client import AsyncMedGemmaClient, MedGemmaError, build_request
from medgemma_triton.client.errors import InvalidArgumentError
from medgemma_triton.contract import TOP_MODEL, LLM_MODEL
from medgemma_triton.gateway.chunks import DONE, Completion, finish_reason, sse
from medgemma_triton.gateway.config import DEFAULT_MODEL_NAME, GatewayConfig
from medgemma_triton.gateway.errors import SERVER_ERROR, APIError, from_client_error, invalid
from medgemma_triton.gateway.messages import map_messages
from medgemma_triton.gateway.middleware import GatewayMiddleware
from medgemma_triton.gateway.params import parse_chat_request
from medgemma_triton.gateway.streaming import ClientGone, EventStream, unless_disconnected

log = logging.getLogger("medgemma_triton.gateway")

HEALTH_PROBE_TIMEOUT_S = 5.0
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer; seen in access logs
_JSON_IN_THREAD_BYTES = 1 << 20  # parse bodies larger than this (images) off the event loop


def model_name_from_checkpoint(checkpoint: str | None) -> str | None:
    """The served checkpoint's name: a Hugging Face cache path's repo name, else the directory name."""
    if not checkpoint:
        return None
    parts = PurePosixPath(checkpoint).parts
    for part in parts:
        if part.startswith("models--"):
            return part.split("--")[-1]
    return parts[-1] if parts else None


async def served_model_name(config: GatewayConfig) -> str:
    """--model-name, else the checkpoint the llm's config names, else medgemma-4b-it."""
    if config.model_name:
        return config.model_name
    import tritonclient.grpc.aio as grpcclient_aio

    triton = grpcclient_aio.InferenceServerClient(config.triton_url)
    try:
        for model in (LLM_MODEL, TOP_MODEL):
            try:
                settings = await triton.get_model_config(model, as_json=True, client_timeout=10)
            except Exception:  # noqa: BLE001 - an older repository or an unreachable server: the default
                continue
            parameters = settings.get("config", {}).get("parameters", {})
            source = parameters.get("source_checkpoint") or parameters.get("checkpoint") or {}
            name = model_name_from_checkpoint(source.get("string_value"))
            if name:
                return name
    finally:
        await triton.close()
    log.warning("could not read the served checkpoint's name from %s; serving as %r (set --model-name)",
                config.triton_url, DEFAULT_MODEL_NAME)
    return DEFAULT_MODEL_NAME


class Gateway:
    """The routes' shared state: settings, the gRPC client, the served model's name."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        self.client: AsyncMedGemmaClient | None = None
        self.model_name = config.model_name or DEFAULT_MODEL_NAME
        self.started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.model_name = await served_model_name(self.config)
        self.client = AsyncMedGemmaClient(self.config.triton_url, timeout=self.config.triton_timeout_s)
        log.info("OpenAI gateway for %s at %s (model %r)", TOP_MODEL, self.config.triton_url, self.model_name)
        try:
            yield
        finally:
            await self.client.close()

    # --- routes ---

    async def health(self, request: Request) -> Response:
        if await self.client.is_ready(timeout=HEALTH_PROBE_TIMEOUT_S):
            return JSONResponse({"status": "ok"})
        return _error_response(APIError(503, f"model {TOP_MODEL} is not ready at {self.config.triton_url}",
                                        type=SERVER_ERROR, code="model_not_ready"))

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.started, "owned_by": "medgemma-triton"}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        self._check_model(request.path_params["model"])
        return JSONResponse(self._model_card())

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    async def chat_completions(self, request: Request) -> Response:
        try:
            body = await _read_json(request, self.config.max_request_bytes)
        except ClientDisconnect:  # gone while sending, or cut off by a deadline (gateway.connections)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        params = parse_chat_request(body, self.config.server_limits)
        self._check_model(params.model)
        chat_request, image_locations = await self._prepare(params)
        stream = self.client.send(chat_request)
        completion = Completion(self.model_name)
        try:
            if not params.stream:
                result = await unless_disconnected(request.receive, stream.final_result())
                return JSONResponse(completion.whole(result))
            deltas = stream.__aiter__()
            first = await unless_disconnected(request.receive, _next_or_none(deltas))
        except ClientGone:
            stream.close_now()
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except MedGemmaError as exc:
            stream.close_now()
            raise from_client_error(exc, image_locations) from None
        return EventStream(_events(stream, deltas, first, completion, params.include_usage, image_locations))

    async def _prepare(self, params):
        """The request's gRPC inputs (messages mapped, images decoded, parameters checked by the
        server's own rules); off the event loop when there are images to decode."""

        def prepare():
            mapped = map_messages(params.messages, self.config.allowed_local_media, self.config.max_request_bytes)
            try:
                request = build_request(mapped.messages, stream=True, timeout=self.config.triton_timeout_s,
                                        **params.sampling)
                return request, mapped.image_locations
            except InvalidArgumentError as exc:
                raise from_client_error(exc, mapped.image_locations) from None

        if _has_image_parts(params.messages):
            return await asyncio.to_thread(prepare)
        return prepare()


def _has_image_parts(messages) -> bool:
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") == "image_url" for p in m["content"])
        for m in messages
    )


async def _next_or_none(deltas):
    return await anext(deltas, None)


async def _events(stream, deltas, first, completion: Completion, include_usage: bool, image_locations):
    """The SSE events of one streamed completion; closing this generator cancels the request."""
    try:
        yield completion.chunk({"role": "assistant", "content": "", "refusal": None}, include_usage=include_usage)
        if first is not None:
            yield completion.chunk({"content": first}, include_usage=include_usage)
            async for delta in deltas:
                yield completion.chunk({"content": delta}, include_usage=include_usage)
        result = stream.result
        yield completion.chunk({}, finish_reason(result.finish_reason), include_usage=include_usage)
        if include_usage:
            yield completion.usage_chunk(result)
        yield DONE
    except MedGemmaError as exc:  # after the 200 was sent: the error travels as an event, as OpenAI's does
        error = from_client_error(exc, image_locations)
        log.warning("streamed request failed upstream: HTTP %d equivalent, %s", error.status, error.code)
        yield sse(error.body())
    finally:
        await deltas.aclose()
        stream.close_now()


async def _read_json(request: Request, limit: int):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        if len(body) > _JSON_IN_THREAD_BYTES:
            return await asyncio.to_thread(json.loads, body)
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over the gateway's limit of {limit} bytes", code="request_too_large")


def _error_response(error: APIError) -> Response:
    if error.status >= 500:
        log.warning("answered HTTP %d (%s)", error.status, error.code)
    return Response(error.json_bytes(), status_code=error.status, media_type="application/json")


async def _api_error(request: Request, exc: APIError) -> Response:
    return _error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = "not_found" if exc.status_code == 404 else None
    return _error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=kind))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unexpected gateway error: %s", type(exc).__name__, exc_info=exc)
    return _error_response(APIError(500, "the gateway failed the request", type=SERVER_ERROR, code="internal_error"))


def create_app(config: GatewayConfig) -> GatewayMiddleware:
    """The ASGI application (uvicorn runs it; see gateway.server)."""
    gateway = Gateway(config)
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", gateway.chat_completions, methods=["POST"]),
            Route("/v1/models", gateway.models, methods=["GET"]),
            Route("/v1/models/{model:path}", gateway.model, methods=["GET"]),
            Route("/health", gateway.health, methods=["GET"]),
        ],
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _unexpected},
        lifespan=gateway.lifespan,
    )
    app.state.gateway = gateway
    return GatewayMiddleware(app, config.api_key)
