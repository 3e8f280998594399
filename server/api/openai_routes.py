"""/v1/chat/completions, /v1/completions, /v1/models in OpenAI's shapes."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api.protocol import APIError, ChatCompletionRequest, CompletionRequest, SamplingFields
from server.engine.async_engine import AsyncEngine, QueueFullError
from server.engine.request import AdapterRef, SamplingParams

router = APIRouter()


def ready_engine(request: Request) -> AsyncEngine:
    engine = request.app.state.engine
    if engine is None:
        raise APIError(503, "the model is still loading; try again shortly", "service_unavailable")
    return engine


def resolve_adapters(engine: AsyncEngine, body: SamplingFields) -> tuple[AdapterRef, ...]:
    """The adapter set of a request, from `model` and the `adapters` extension field."""
    core = engine.engine
    if body.model not in ("auto", core.model_name) and body.model not in core.pool:
        raise APIError(404, f"The model `{body.model}` does not exist.", "NotFoundError", "model", "model_not_found")
    if body.composition in ("gate", "merge"):
        raise APIError(400, f"composition `{body.composition}` needs the retrieval/gate issue; use `mixture` "
                            "or `select`", param="composition")
    choices = body.adapter_choices()
    for c in choices:
        if c.name not in core.pool:
            raise APIError(404, f"The adapter `{c.name}` does not exist.", "NotFoundError", "adapters",
                           "adapter_not_found")
    names = [(c.name, c.weight) for c in choices]
    if not names and body.model in core.pool:
        names = [(body.model, 1.0)]
    if body.composition == "select" and names:
        names = [max(names, key=lambda nw: nw[1])]
    total = sum(w for _, w in names)
    return tuple(AdapterRef(n, w / total) for n, w in names)  # weights of a set sum to 1


def sampling_params(engine: AsyncEngine, body: SamplingFields, num_prompt_tokens: int) -> SamplingParams:
    if body.n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    if body.logprobs:
        raise APIError(400, "logprobs are not supported", param="logprobs")
    window = engine.engine.max_model_len
    max_tokens = body.token_limit() or window - num_prompt_tokens
    if num_prompt_tokens + max_tokens > window:
        raise APIError(400, f"This model's maximum context length is {window} tokens. However, you requested "
                            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the messages, "
                            f"{max_tokens} in the completion).", param="messages", code="context_length_exceeded")
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                          seed=body.seed, stop=body.stop_list(), ignore_eos=body.ignore_eos)


def adapters_field(adapters: tuple[AdapterRef, ...]) -> list[dict]:
    return [{"name": a.name, "weight": round(a.weight, 4)} for a in adapters]


def adapters_header(adapters: tuple[AdapterRef, ...]) -> dict[str, str]:
    return {"x-mole-adapters": ",".join(f"{a.name}={a.weight:.4g}" for a in adapters)}


class Generation:
    """One engine request seen from HTTP: runs it, times it, counts it in the metrics."""

    def __init__(self, request: Request, route: str, prompt_ids: list[int], body: SamplingFields) -> None:
        self.engine = ready_engine(request)
        self.metrics = request.app.state.metrics
        self.route = route
        self.adapters = resolve_adapters(self.engine, body)
        self.prompt_ids = prompt_ids
        self.sampling = sampling_params(self.engine, body, len(prompt_ids))
        self.text, self.finish_reason, self.completion_tokens = "", None, 0
        self.start = time.perf_counter()
        try:  # submitted now, so a full queue or a bad request is an HTTP error before any byte is sent
            self.outputs = self.engine.generate(prompt_ids, self.sampling, self.adapters)
        except QueueFullError as e:
            raise APIError(429, str(e), "rate_limit_error", headers={"Retry-After": "1"}) from e
        except ValueError as e:
            raise APIError(400, str(e)) from e
        except KeyError as e:  # an adapter deleted since resolve_adapters looked
            raise APIError(404, str(e.args[0]), "NotFoundError", "adapters", "adapter_not_found") from e

    async def deltas(self) -> AsyncIterator[str]:
        start = first = self.start
        try:
            async for out in self.outputs:
                if out.error:
                    raise APIError(500, out.error, "server_error")
                if self.completion_tokens == 0 and out.num_output_tokens:
                    first = time.perf_counter()
                    self.metrics.ttft.observe(first - start)
                self.completion_tokens = out.num_output_tokens
                self.text += out.text
                if out.finished:
                    self.finish_reason = out.finish_reason.value
                if out.text:
                    yield out.text
        finally:  # also when the client disconnects mid-stream (the task is cancelled)
            self.outputs.close()
        end = time.perf_counter()
        self.metrics.latency.labels(self.route).observe(end - start)
        if self.completion_tokens > 1:
            self.metrics.tpot.observe((end - first) / (self.completion_tokens - 1))
        self.metrics.prompt_tokens.inc(len(self.prompt_ids))
        self.metrics.completion_tokens.inc(self.completion_tokens)
        for a in self.adapters:
            self.metrics.count_adapter(a.name)

    async def run(self) -> None:
        async for _ in self.deltas():
            pass

    def usage(self) -> dict:
        n = len(self.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": self.completion_tokens,
                "total_tokens": n + self.completion_tokens}


def total_usage(gens: list[Generation]) -> dict:
    return {k: sum(g.usage()[k] for g in gens) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    engine = ready_engine(request)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    prompt_ids = engine.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                             return_dict=True)["input_ids"]
    gen = Generation(request, "/v1/chat/completions", prompt_ids, body)
    rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model
    if not body.stream:
        await gen.run()
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text}, "logprobs": None,
                         "finish_reason": gen.finish_reason}],
            "usage": gen.usage(), "adapters": adapters_field(gen.adapters),
        }, headers=adapters_header(gen.adapters))

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    async def events() -> AsyncIterator[str]:
        yield sse({**chunk({"role": "assistant", "content": ""}), "adapters": adapters_field(gen.adapters)})
        async for text in gen.deltas():
            yield sse(chunk({"content": text}))
        yield sse(chunk({}, gen.finish_reason))
        if body.stream_options and body.stream_options.include_usage:
            yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": gen.usage()})
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=adapters_header(gen.adapters))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    engine = ready_engine(request)
    tokenizer = engine.engine.tokenizer
    gens: list[Generation] = []
    try:
        for p in body.prompts():
            gens.append(Generation(request, "/v1/completions", tokenizer(p)["input_ids"], body))
    except APIError:
        for g in gens:  # release the prompts already submitted
            g.outputs.close()
        raise
    rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.model

    def choice(i: int, text: str, finish: str | None) -> dict:
        return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}

    if not body.stream:
        await asyncio.gather(*(g.run() for g in gens))
        usage = total_usage(gens)
        prefix = [p if body.echo else "" for p in body.prompts()]
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [choice(i, prefix[i] + g.text, g.finish_reason) for i, g in enumerate(gens)],
            "usage": usage, "adapters": adapters_field(gens[0].adapters),
        }, headers=adapters_header(gens[0].adapters))

    def chunk(i: int, text: str, finish: str | None = None) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [choice(i, text, finish)]}

    async def events() -> AsyncIterator[str]:
        for i, g in enumerate(gens):  # one prompt after the other: choices keep their order
            async for text in g.deltas():
                yield sse(chunk(i, text))
            yield sse(chunk(i, "", g.finish_reason))
        if body.stream_options and body.stream_options.include_usage:
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                       "usage": total_usage(gens)})
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=adapters_header(gens[0].adapters))


@router.get("/v1/models")
async def list_models(request: Request):
    engine = ready_engine(request).engine
    created = int(time.time())
    base = engine.model_name

    def card(model_id: str, parent: str | None) -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "mole-serve", "root": base,
                "parent": parent}

    data = [card(base, None), card("auto", base)] + [card(n, base) for n in engine.pool.names]
    return {"object": "list", "data": data}
