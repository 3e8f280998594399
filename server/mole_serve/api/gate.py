"""RequestGate: the outermost ASGI layer, where every HTTP request enters and leaves (docs/limits.md).

In, in this order: the head's size; credentials, checked before a byte of the body is read; a /v1
body, read whole here within its size and time limits; then a watch for the client's departure.
Out: an exception no handler answered becomes a 500 that closes the connection, and every answer
is counted."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from mole_serve.api.errors import APIError

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DISCONNECTED = "mole.disconnected"  # scope key: an asyncio.Event set when the client goes away
TOO_LARGE = "request_too_large"
BODY_TIMEOUT = "request_timeout"
MAX_HEAD_BYTES = 64 << 10  # a request line and its headers (h11 refuses past 16 KiB, nginx past 32 KiB)


def head_too_large() -> APIError:
    return APIError(431, f"The request's headers are over {MAX_HEAD_BYTES} bytes.", code="headers_too_large")


class BodyTimedOut(Exception):
    """A request body stopped arriving (raised from the receive the gate hands an upload route)."""


class Refusal(Exception):
    """A /v1 body the gate will not read on: the error to answer, and the connection then closes."""

    def __init__(self, error: APIError) -> None:
        super().__init__(error.message)
        self.error = error


class RequestGate:
    """A head over MAX_HEAD_BYTES is a 431 (one still arriving is the HTTP server's to bound).
    authorize(path, Authorization header): the error refusing the request, or None.
    count(route, status): one answer, for the metrics (route: the matched route's template,
    `unmatched`, or `/v1` / `/admin` for a request refused before routing).
    body_limit (bytes) and body_timeout_s bound a /v1 body, which is read here and handed to the app
    whole: 413 as soon as its Content-Length or the bytes arrived pass the limit, 408 when it has
    not arrived whole within the time. Other routes read their own bodies (an upload streams), each
    piece within body_timeout_s of the last, else 408."""

    def __init__(
        self,
        app: ASGIApp,
        authorize: Callable[[str, str | None], APIError | None],
        count: Callable[[str, int], None],
        body_limit: int,
        body_timeout_s: float,
    ) -> None:
        self.app, self.authorize, self.count = app, authorize, count
        self.body_limit, self.body_timeout_s = body_limit, body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        headers = dict(scope["headers"])
        prefix = "/v1" if path.startswith("/v1/") else "/admin" if path.startswith("/admin") else None
        head = len(scope.get("raw_path") or b"") + len(scope.get("query_string", b""))
        head += sum(len(name) + len(value) for name, value in scope["headers"])
        if head > MAX_HEAD_BYTES:
            return await self._answer(send, head_too_large(), prefix or "unmatched", close=True)
        authorization = headers.get(b"authorization")
        denied = self.authorize(path, authorization.decode("latin-1") if authorization is not None else None)
        if denied is not None:  # the body, if any, is never read (the server discards it)
            return await self._answer(send, denied, prefix or "unmatched", close=False)
        if prefix != "/v1":
            return await self._serve(scope, self._timed(receive), send)
        try:
            body = await self._read_body(headers.get(b"content-length"), receive)
        except Refusal as refusal:
            return await self._answer(send, refusal.error, prefix, close=True)
        if body is None:
            return  # the client left
        gone = scope[DISCONNECTED] = asyncio.Event()

        async def listen() -> None:  # a non-streaming handler has no other way to see the client leave
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        listener = asyncio.create_task(listen())
        try:
            await self._serve(scope, self._replay(body, receive), send)
        finally:
            listener.cancel()

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        status: int | None = None

        async def tracked(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except BodyTimedOut:
            if status is not None:
                raise
            status = 408
            await self._send(send, self._body_timeout(), close=True)
        except Exception:
            if status is not None:  # mid-response: nothing more can be said, the server drops the connection
                raise
            log.exception("unhandled error on %s", scope["path"])
            status = 500
            # the connection closes: whatever the failure left half-read must not meet the next request
            await self._send(send, APIError(500, "The server failed on this request.", "server_error"), close=True)
        finally:
            if status is not None:  # (none: the client left before its answer)
                self.count(getattr(scope.get("route"), "path", "unmatched"), status)

    async def _read_body(self, declared: bytes | None, receive: Receive) -> bytes | None:
        """The whole /v1 body, or None if the client left. Raises Refusal (413, 408)."""
        if declared is not None and (not declared.isdigit() or int(declared) > self.body_limit):
            raise Refusal(self._too_large())
        chunks: list[bytes] = []
        size, more = 0, True

        async def read() -> bool:
            nonlocal size, more
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return False
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.body_limit:
                    raise Refusal(self._too_large())
                chunks.append(chunk)
                more = message.get("more_body", False)
            return True

        try:
            arrived = await asyncio.wait_for(read(), self.body_timeout_s)
        except asyncio.TimeoutError:
            raise Refusal(self._body_timeout()) from None
        return b"".join(chunks) if arrived else None

    @staticmethod
    def _replay(body: bytes, receive: Receive) -> Receive:
        """The receive the app gets: the body read, then whatever the client sends next (its departure)."""
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    def _timed(self, receive: Receive) -> Receive:
        """receive, where each piece of the body must come within body_timeout_s of the last."""
        body_done = False

        async def timed() -> Message:
            nonlocal body_done
            if body_done:  # after the body only the departure comes, whenever it does
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except asyncio.TimeoutError:
                raise BodyTimedOut from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return timed

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body is over {self.body_limit} bytes (MOLE_MAX_REQUEST_MB).", code=TOO_LARGE)

    def _body_timeout(self) -> APIError:
        return APIError(
            408,
            f"The request body did not arrive within {self.body_timeout_s:g} s (MOLE_BODY_TIMEOUT_S).",
            code=BODY_TIMEOUT,
        )

    async def _answer(self, send: Send, error: APIError, route: str, close: bool) -> None:
        await self._send(send, error, close)
        self.count(route, error.status)

    @staticmethod
    async def _send(send: Send, error: APIError, close: bool) -> None:
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in error.headers.items()]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
