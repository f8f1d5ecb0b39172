"""Server-sent events, and noticing that the HTTP client has gone.

A generation runs for seconds; a client that disconnects must stop it on the server, not only stop
being written to. Waiting for the next event would notice the disconnect only when the next token
comes (or never, for a request that does not stream), so each request also waits on ASGI `receive`
for `http.disconnect` and cancels the work in progress, which closes the gRPC stream
(client.AsyncChatStream cancels its call when the task reading it is cancelled, or when closed).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Mapping

SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",  # proxies such as nginx would otherwise hold the events back
}


class ClientGone(Exception):
    """The HTTP client disconnected before the answer was sent."""


async def wait_for_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(receive, work: Awaitable):
    """`await work`, unless the client disconnects first: then `work` is cancelled and ClientGone raised."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientGone
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending


class EventStream:
    """An ASGI response that sends `events` (SSE-framed bytes) and stops them when the client goes.

    `events` is closed in every case (finished, failed, or the client gone), and closing it is what
    ends the request upstream.
    """

    def __init__(self, events: AsyncIterator[bytes], headers: Mapping[str, str] | None = None):
        self.events = events
        self.headers = {**SSE_HEADERS, **(headers or {})}

    async def __call__(self, scope, receive, send) -> None:
        async def pump() -> None:
            await send({
                "type": "http.response.start",
                "status": 200,
                "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()],
            })
            async for event in self.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await unless_disconnected(receive, pump())
        except (ClientGone, OSError):  # OSError: a send after the client went (ASGI spec 2.4)
            pass
        finally:
            await self.events.aclose()
