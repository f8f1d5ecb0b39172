"""uvicorn's HTTP/1.1 protocol with deadlines on what the client sends, and a cap on connections.

uvicorn 0.55 bounds only the idle time between requests (`timeout_keep_alive`, restarted by any byte).
A connection that never sends, or sends its headers or body a byte at a time, is otherwise held for
ever, and enough of them use up the process's file descriptors, so that a real request gets no
answer at all. Each connection here is always waiting on at most one deadline (ConnectionLimits):

- headers: from the connection's opening, or its previous response, to the request's complete
  headers; then it is closed (with a 408 if a request had begun);
- body: body_timeout_s after the headers, moved on by 1 s per body_min_rate bytes that arrive but
  never beyond body_timeout_s from now; then a 408 (unless a response has started) and closed;
- connections over the cap have their requests answered 503 as soon as their headers arrive.

Assumes uvicorn's httptools protocol (httptools is pinned in the gateway extra): the methods below are
its parser callbacks, and its on_headers_complete reads `self.app` for the application to run.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from medgemma_triton.gateway.config import ConnectionLimits
from medgemma_triton.gateway.errors import SERVER_ERROR, APIError, send_error

log = logging.getLogger("medgemma_triton.gateway")


def guarded_protocol(limits: ConnectionLimits, max_connections: int) -> type[HttpToolsProtocol]:
    """The protocol class for uvicorn's `http` setting (uvicorn builds one per connection)."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,),
                {"limits": limits, "max_connections": max_connections})


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    limits: ConnectionLimits
    max_connections: int

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gateway_app = self.app
        self.deadline_timer = None
        self.body_deadline = 0.0  # loop time; moves on as body bytes arrive
        self.request_begun = False  # the next request's first bytes are in, its headers not yet
        self.receiving_body = False

    # --- uvicorn's protocol and parser callbacks ---

    def connection_made(self, transport):
        super().connection_made(transport)
        self._await_headers()

    def connection_lost(self, exc):
        self._cancel_deadline()
        super().connection_lost(exc)

    def on_message_begin(self):
        super().on_message_begin()
        self.request_begun = True

    def on_headers_complete(self):
        self._cancel_deadline()
        self.request_begun = False
        self.receiving_body = True
        self.body_deadline = self.loop.time() + self.limits.body_timeout_s
        self.deadline_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_deadline_passed)
        over_cap = len(self.connections) > self.max_connections
        self.app = self._over_capacity if over_cap else self.gateway_app
        super().on_headers_complete()

    def on_body(self, body: bytes):
        # never more than body_timeout_s ahead: a fast start buys no long stall later
        self.body_deadline = min(self.body_deadline + len(body) / self.limits.body_min_rate,
                                 self.loop.time() + self.limits.body_timeout_s)
        super().on_body(body)

    def on_message_complete(self):
        self.receiving_body = False
        self._cancel_deadline()
        super().on_message_complete()

    def on_response_complete(self):
        super().on_response_complete()
        # a body still arriving keeps its own deadline; a started pipelined request has none
        if not self.transport.is_closing() and not self.receiving_body and self.cycle.response_complete:
            self._await_headers()

    # --- deadlines ---

    def _await_headers(self):
        self._cancel_deadline()
        self.deadline_timer = self.loop.call_later(self.limits.header_timeout_s, self._headers_deadline_passed)

    def _cancel_deadline(self):
        if self.deadline_timer is not None:
            self.deadline_timer.cancel()
            self.deadline_timer = None

    def _headers_deadline_passed(self):
        self.deadline_timer = None
        if not self.request_begun:  # idle: nothing to answer
            self.transport.close()
            return
        self._refuse(f"the request's headers did not arrive within {self.limits.header_timeout_s:g} s "
                     f"({ConnectionLimits.env_name('header_timeout_s')})", answer=True)

    def _body_deadline_passed(self):
        self.deadline_timer = None
        remaining = self.body_deadline - self.loop.time()
        if remaining > 0:
            self.deadline_timer = self.loop.call_later(remaining, self._body_deadline_passed)
            return
        self._refuse(f"the request body did not arrive in time: {self.limits.body_timeout_s:g} s after the "
                     f"headers plus 1 s per {self.limits.body_min_rate} bytes received "
                     f"({ConnectionLimits.env_name('body_timeout_s')}, {ConnectionLimits.env_name('body_min_rate')})",
                     answer=not self.cycle.response_started)

    def _refuse(self, reason: str, answer: bool):
        """Close the connection, first answering 408 with OpenAI's error body if `answer`."""
        if self.transport.is_closing():
            return
        client = "%s:%d" % self.client if self.client else "a client"
        log.warning("closing the connection from %s: %s", client, reason)
        if answer:
            self.transport.write(_response_bytes(APIError(408, reason, code="request_timeout")))
        if self.cycle is not None:
            self.cycle.disconnected = True  # the application's own answer, if it comes, is not sent
        self.transport.close()

    # --- over the connection cap ---

    async def _over_capacity(self, scope, receive, send):
        error = APIError(503, f"the gateway is at its limit of {self.max_connections} open connections; retry "
                              f"later ({ConnectionLimits.env_name('max_connections')})",
                         type=SERVER_ERROR, code="too_many_connections")
        await send_error(send, error, [(b"connection", b"close"), (b"retry-after", b"1")])


def _response_bytes(error: APIError) -> bytes:
    body = error.json_bytes()
    head = (f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body
