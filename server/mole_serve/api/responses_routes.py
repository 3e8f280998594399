"""POST /v1/responses: OpenAI's Responses API, stateless, over the chat route's path: the request
reads as a chat request (responses_protocol.py), its one generation is written as a response,
whole or as the Responses stream's typed events."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mole_serve.api.errors import APIError
from mole_serve.api.openai_routes import start_chat
from mole_serve.api.responses_protocol import (
    ContentPartEvent,
    ErrorEvent,
    IncompleteDetails,
    LifecycleEvent,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    Status,
    StreamEvent,
    TextConfig,
    TextDeltaEvent,
    TextDoneEvent,
)
from mole_serve.api.serving import Generation, adapters_header, run_to_end
from mole_serve.errors import MoleError

router = APIRouter()
ROUTE = "/v1/responses"
# the chat path's param names -> the Responses request's, for the errors it raises
CHAT_PARAMS = {
    "messages": "input",
    "response_format": "text.format",
    "response_format.json_schema.schema": "text.format.schema",
}


class ResponseWriter:
    """One generation as a response: its state at any point, and the events of its stream."""

    def __init__(self, body: ResponsesRequest, max_output_tokens: int | None, gen: Generation) -> None:
        self.body, self.max_output_tokens, self.gen = body, max_output_tokens, gen
        self.id, self.item_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self._sequence = itertools.count()

    def response(self, finished: bool) -> ResponseObject:
        """The response in progress (no output yet), or whole once the generation finished: cut by
        the token limit (or the context window) it is `incomplete`."""
        body, g = self.body, self.gen
        status: Status = "in_progress"
        if finished:
            status = "incomplete" if g.finish_reason == "length" else "completed"
        n = g.prompt_tokens
        usage = ResponseUsage(input_tokens=n, output_tokens=g.completion_tokens, total_tokens=n + g.completion_tokens)
        return ResponseObject(
            id=self.id,
            created_at=self.created_at,
            completed_at=int(time.time()) if status == "completed" else None,
            status=status,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
            instructions=body.instructions,
            max_output_tokens=self.max_output_tokens,
            model=body.model,
            output=[self.message(status)] if finished else [],
            parallel_tool_calls=body.parallel_tool_calls is not False,
            temperature=body.temperature,
            top_p=body.top_p,
            tool_choice=body.tool_choice or "auto",
            text=body.text or TextConfig(),
            metadata=body.metadata or {},
            user=body.user,
            safety_identifier=body.safety_identifier,
            usage=usage if finished else None,
            adapters=g.adapters,
        )

    def message(self, status: Status) -> OutputMessage:
        content = [] if status == "in_progress" else [OutputText(text=self.gen.text)]
        return OutputMessage(id=self.item_id, status=status, content=content)

    def _sse(self, event: StreamEvent) -> str:
        return f"event: {event.type}\ndata: {event.model_dump_json(by_alias=True)}\n\n"

    def _next(self) -> int:
        return next(self._sequence)

    async def events(self) -> AsyncIterator[str]:
        """The stream: the response created and in progress, its message and text part opened,
        the text's deltas, everything closed again, and the response completed (or incomplete).
        An error once the stream began is an `error` event, which ends it."""
        at = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        for kind in ("response.created", "response.in_progress"):
            yield self._sse(LifecycleEvent(type=kind, sequence_number=self._next(), response=self.response(False)))
        opened = self.message("in_progress")
        yield self._sse(
            OutputItemEvent(
                type="response.output_item.added", sequence_number=self._next(), output_index=0, item=opened
            )
        )
        yield self._sse(
            ContentPartEvent(
                type="response.content_part.added", sequence_number=self._next(), part=OutputText(text=""), **at
            )
        )
        try:
            async for text in self.gen.deltas():
                yield self._sse(TextDeltaEvent(sequence_number=self._next(), delta=text, **at))
        except MoleError as e:
            error = APIError.of(e)
            code = error.code or error.type
            yield self._sse(
                ErrorEvent(sequence_number=self._next(), code=code, message=error.message, param=error.param)
            )
            return
        whole = self.response(True)
        message = whole.output[0]
        yield self._sse(TextDoneEvent(sequence_number=self._next(), text=self.gen.text, **at))
        yield self._sse(
            ContentPartEvent(
                type="response.content_part.done", sequence_number=self._next(), part=message.content[0], **at
            )
        )
        yield self._sse(
            OutputItemEvent(
                type="response.output_item.done", sequence_number=self._next(), output_index=0, item=message
            )
        )
        kind = "response.completed" if whole.status == "completed" else "response.incomplete"
        yield self._sse(LifecycleEvent(type=kind, sequence_number=self._next(), response=whole))


@router.post(ROUTE)
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    chat = body.chat_request()
    try:
        gens, _ = await start_chat(chat, request, ROUTE)  # (no tools: nothing to read as calls)
    except APIError as e:
        e.param = CHAT_PARAMS.get(e.param or "", e.param)
        raise
    writer = ResponseWriter(body, chat.token_limit(), gens[0])
    headers = adapters_header(gens[0].adapters)
    if body.stream:
        return StreamingResponse(writer.events(), media_type="text/event-stream", headers=headers)
    await run_to_end(gens, request)
    return JSONResponse(writer.response(True).model_dump(mode="json", by_alias=True), headers=headers)
