"""Bounds checked before work is spent on a request: the body size of /v1 routes (before it is
read or parsed), and a prompt's length in characters against the context window (before the
tokenizer runs: a token covers at most `max_token_chars` characters)."""

from __future__ import annotations

import asyncio
import json

from mole_serve.api.errors import APIError

TOO_LARGE = "request_too_large"
DISCONNECTED = "mole.disconnected"  # scope key: an asyncio.Event set when the client goes away


def _too_large_body(limit: int) -> bytes:
    return json.dumps(
        APIError(
            413, f"The request body is over {limit} bytes (MOLE_MAX_REQUEST_MB).", param=None, code=TOO_LARGE
        ).body()
    ).encode()


class BodyLimit:
    """ASGI middleware, outermost: a /v1 body over `limit` bytes is a 413 as soon as that is known,
    from its Content-Length or, for a chunked body, while it arrives; a body within it is read here
    and handed to the app whole. Then it listens for the client's departure and sets
    scope[DISCONNECTED] (Starlette's BaseHTTPMiddleware hides a disconnect from
    Request.is_disconnected, so a non-streaming handler could not see it)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            return await self._refuse(send)
        body, more = b"", True
        while more:  # read (at most limit bytes) before the app parses anything
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._refuse(send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        gone = scope[DISCONNECTED] = asyncio.Event()

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        listener = asyncio.create_task(listen())
        try:
            await self.app(scope, replay, send)
        finally:
            listener.cancel()

    async def _refuse(self, send) -> None:
        body = _too_large_body(self.limit)
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def check_prompt_chars(num_chars: int, max_token_chars: int, window: int) -> None:
    """Refuse a prompt that cannot fit the window whatever the tokenizer makes of it."""
    if num_chars > window * max_token_chars:
        raise APIError(
            400,
            f"This model's maximum context length is {window} tokens; the prompt's {num_chars} "
            f"characters are more than {window} tokens of at most {max_token_chars} characters.",
            param="messages",
            code="context_length_exceeded",
        )
