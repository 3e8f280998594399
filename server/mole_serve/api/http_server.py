"""How `mole-serve serve` runs the app on uvicorn: its connection limits from Settings (docs/limits.md),
and the bounds on a request's head that uvicorn lacks: it times out idle keep-alive connections only,
so a client trickling its headers, or one that opens a connection and sends nothing, would hold a
connection for ever; and with httptools (its HTTP parser when installed) a head may be any size."""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from mole_serve.api.gate import MAX_HEAD_BYTES, head_too_large
from mole_serve.config import Settings


def _head_too_large_response() -> bytes:
    body = json.dumps(head_too_large().body()).encode()
    head = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    return head + b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body


class RequestHeadLimits(asyncio.Protocol):
    """Mixed into uvicorn's HTTP protocol. Between two requests (from the connection's opening, or
    from the first byte after an answer) the next request's head must arrive within
    `head_timeout_s`, else the connection closes; the idle wait before that first byte stays
    uvicorn's keep-alive timeout. A head still incomplete past MAX_HEAD_BYTES is a 431 and the
    connection closes (a whole head that is too large is the gate's to refuse, api/gate.py).

    Reads the protocol's `cycle` (the request in progress; both of uvicorn's HTTP protocols keep
    one): no cycle, or one whose response is complete, means the connection is between requests.
    A complete response whose request body is still arriving (an answer sent before the body was
    read, as a 401 is) is discarded by uvicorn: that counts against the deadline, not the size."""

    head_timeout_s: float
    _deadline: asyncio.TimerHandle | None = None
    _transport: asyncio.BaseTransport | None = None
    _head_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._transport = transport
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        cycle = getattr(self, "cycle", None)
        if cycle is not None and not cycle.response_complete:  # a head arrived: its request runs
            self._disarm()
            self._head_bytes = 0
            return
        if self._deadline is None:
            self._arm()
        if cycle is None or not cycle.more_body:  # (else: the rest of an answered request's body)
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES and self._transport is not None:
                cast(asyncio.Transport, self._transport).write(_head_too_large_response())
                self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._deadline = asyncio.get_running_loop().call_later(self.head_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        cycle = getattr(self, "cycle", None)
        waiting = cycle is None or cycle.response_complete
        if waiting and self._transport is not None and not self._transport.is_closing():
            self._transport.close()


def limited_protocol(head_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools when installed, else h11) with RequestHeadLimits mixed in."""
    protocol = type("LimitedHTTPProtocol", (RequestHeadLimits, AutoHTTPProtocol), {"head_timeout_s": head_timeout_s})
    return cast(type[asyncio.Protocol], protocol)


def uvicorn_config(app: Any, settings: Settings, **options: Any) -> uvicorn.Config:
    """The uvicorn.Config of `mole-serve serve`; options: any other uvicorn.Config argument (or an override)."""
    return uvicorn.Config(
        app,
        **{
            "host": settings.host,
            "port": settings.port,
            "log_level": "info",
            "http": limited_protocol(settings.header_timeout_s),
            "timeout_keep_alive": settings.keep_alive_timeout_s,
            "limit_concurrency": settings.max_connections,
            **options,
        },
    )
