"""An OpenAI-compatible chat completions gateway in front of the `medgemma` model.

    medgemma-triton openai --triton-url 127.0.0.1:8001 --port 9000

OpenAI clients (the `openai` SDK, curl, LangChain, ...) speak HTTP + JSON; the gateway maps each
request onto the model card's message format the `medgemma` model takes and sends it over one
shared asyncio gRPC channel (client.AsyncMedGemmaClient). It holds no model and applies no chat
template: tokens, limits and refusals are the server's. See docs/openai.md.

Modules, by job: config (settings), params (request body -> sampling keywords), messages, media and
images (OpenAI messages -> model-card messages and the image bytes sent), errors (OpenAI's error
JSON), chunks (OpenAI's response objects), streaming (SSE and client disconnects), middleware (API
key, request id), app (the routes), connections (deadlines for slow clients, the connection cap),
logs (the access log's format), server (uvicorn, and running beside `medgemma-triton serve`).
"""

from medgemma_triton.gateway.app import create_app
from medgemma_triton.gateway.config import GatewayConfig

__all__ = ["GatewayConfig", "create_app"]
