"""The deployment under test: a Triton gRPC endpoint serving the `medgemma` model.

Requests go through the project's own `AsyncMedGemmaClient` (what users run), streaming, so each
text delta's arrival is observable: a delta is a "content response" in AIPerf's sense (genai-perf
likewise counts responses with non-empty text). Token counts come from the server's
`prompt_tokens` / `completion_tokens`. Metadata and statistics use tritonclient directly: the
user-facing client does not expose them.
"""

from __future__ import annotations

import time

from .. import contract
from .metrics import RequestRecord
from .workload import BenchRequest


class TritonTarget:
    """An asyncio gRPC connection to a deployment; use as `async with TritonTarget(url) as target`."""

    def __init__(self, url: str, model: str = contract.TOP_MODEL, request_timeout_s: float = 600.0):
        self.url = url
        self.model = model
        self.request_timeout_s = request_timeout_s
        self.client = None  # tritonclient.grpc.aio: metadata, configs, statistics
        self.chat_client = None  # medgemma_triton.client.AsyncMedGemmaClient: the requests

    async def __aenter__(self) -> "TritonTarget":
        import tritonclient.grpc.aio as grpcclient

        from ..client import AsyncMedGemmaClient

        self.client = grpcclient.InferenceServerClient(self.url)
        self.chat_client = AsyncMedGemmaClient(self.url, model=self.model, timeout=self.request_timeout_s)
        try:
            await self.chat_client.check_ready()
        except Exception:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.chat_client.close()
        await self.client.close()

    async def send(self, request: BenchRequest, index: int) -> RequestRecord:
        """Stream one request greedily (temperature 0, the model card's setting)."""
        from ..client import MedGemmaError, ServerBusyError

        record = RequestRecord(index=index, start_s=time.perf_counter(), num_images=len(request.images))
        stream = None
        try:
            stream = self.chat_client.stream_chat(
                request.client_messages(), max_tokens=request.max_tokens, temperature=0.0
            )
            async with stream:
                async for _delta in stream:
                    record.content_times_s.append(time.perf_counter())
                    record.content_tokens.append(stream.completion_tokens - sum(record.content_tokens))
        except MedGemmaError as exc:
            record.error = f"{type(exc).__name__}: {exc}"
            record.refused = isinstance(exc, ServerBusyError)
        except Exception as exc:  # noqa: BLE001 - a broken stream is a failed request, not a failed benchmark
            record.error = f"{type(exc).__name__}: {exc}"
        record.end_s = time.perf_counter()
        if stream is not None:
            record.first_token_s = stream.first_token_at
        result = stream.result if stream is not None else None
        if result is not None:
            record.input_tokens = result.prompt_tokens
            record.output_tokens = result.completion_tokens
            record.finish_reason = result.finish_reason
        if record.error is None and not record.content_times_s:
            # no content response means no TTFT: genai-perf/AIPerf count such a record as invalid too
            record.error = f"no text in the answer (finish_reason {record.finish_reason!r}, {record.output_tokens} tokens)"
        return record

    async def image_size(self) -> tuple[int, int] | None:
        """The served vision encoder's input geometry (pixel_values [3, S, S]); None if text-only."""
        try:
            config = (await self.client.get_model_config(contract.VISION_ENCODER_MODEL, as_json=True))["config"]
        except Exception:  # noqa: BLE001 - no vision encoder served: a text-only deployment
            return None
        for tensor in config.get("input", []):
            dims = [int(d) for d in tensor.get("dims", [])]
            if len(dims) >= 2 and dims[-1] == dims[-2] and dims[-1] > 0:
                return dims[-1], dims[-2]
        return None

    async def statistics(self) -> dict:
        """Triton's statistics extension, every model: {name: model_stats JSON}."""
        stats = await self.client.get_inference_statistics(as_json=True)
        return {entry["name"]: entry for entry in stats.get("model_stats", [])}

    async def metadata(self) -> dict:
        """What the deployment says about itself: server version, models, their parameters."""
        server = await self.client.get_server_metadata(as_json=True)
        models = {}
        for name in (
            contract.TOP_MODEL,
            contract.PREPROCESSING_MODEL,
            contract.VISION_ENCODER_MODEL,
            contract.LLM_MODEL,
        ):
            try:
                config = (await self.client.get_model_config(name, as_json=True))["config"]
            except Exception:  # noqa: BLE001 - a model this deployment does not serve
                continue
            models[name] = {
                "backend": config.get("backend") or config.get("platform", ""),
                "decoupled": bool(config.get("model_transaction_policy", {}).get("decoupled", False)),
                "max_batch_size": config.get("max_batch_size", 0),
                "instances": [
                    {"kind": g.get("kind", ""), "count": g.get("count", 1)} for g in config.get("instance_group", [])
                ],
                "parameters": {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()},
            }
        return {
            "url": self.url,
            "server": {"name": server.get("name"), "version": server.get("version")},
            "models": models,
        }
