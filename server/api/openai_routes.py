"""/v1/chat/completions, /v1/completions, /v1/models in OpenAI's shapes."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api.protocol import APIError, ChatCompletionRequest, CompletionRequest, MergeOptions, SamplingFields
from server.engine.async_engine import AsyncEngine, QueueFullError
from server.engine.engine import StepOutput
from server.engine.request import AdapterRef, MergeSpec, SamplingParams, Selection

router = APIRouter()


def ready_engine(request: Request) -> AsyncEngine:
    engine = request.app.state.engine
    if engine is None:
        raise APIError(503, "the model is still loading; try again shortly", "service_unavailable")
    return engine


def build_selection(engine: AsyncEngine, body: SamplingFields, query: str) -> Selection | None:
    """How the engine picks this request's adapters, from `model` and the extension fields (DESIGN
    section 2): `auto` retrieves (unless `adapters` names the candidates), an adapter's name is that
    adapter, the base model's id is no adapter unless `adapters` names some."""
    core = engine.engine
    explicit = tuple(AdapterRef(c.name, c.weight) for c in body.adapter_choices())
    if body.model not in ("auto", core.model_name):
        if body.model not in core.pool:
            raise APIError(404, f"The model `{body.model}` does not exist.", "NotFoundError", "model",
                           "model_not_found")
        explicit = explicit or (AdapterRef(body.model),)
    if body.model != "auto" and not explicit:
        return None
    composition = body.composition or ("gate" if core.pool.gate is not None else "mixture")
    merge = body.merge or MergeOptions()
    try:
        return Selection(composition, explicit, query if body.model == "auto" else None,
                         body.top_k or core.settings.retrieval_top_k,
                         MergeSpec(merge.strategy, merge.density, merge.seed))
    except ValueError as e:
        raise APIError(400, str(e), param="composition") from e


def retrieval_query(messages: list[dict], mode: str) -> str:
    """The text retrieval embeds: the last user turn, or every turn (settings.retrieval_query)."""
    if mode == "conversation":
        return "\n".join(m["content"] for m in messages if m["role"] != "system")
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


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


def adapters_header(report: list[dict]) -> dict[str, str]:
    return {"x-mole-adapters": ",".join(f"{a['name']}={a['weight']:.4g}" for a in report)}


class Generation:
    """One engine request seen from HTTP: runs it, times it, counts it in the metrics."""

    def __init__(self, request: Request, route: str, prompt_ids: list[int], body: SamplingFields,
                 query: str) -> None:
        self.engine = ready_engine(request)
        self.metrics = request.app.state.metrics
        self.route = route
        self.prompt_ids = prompt_ids
        selection = build_selection(self.engine, body, query)
        self.sampling = sampling_params(self.engine, body, len(prompt_ids))
        self.text, self.finish_reason, self.completion_tokens = "", None, 0
        self.adapters: list[dict] = []  # the engine's report: names, weights, scores, gate weights
        self.gate_entropy: float | None = None
        self._first: StepOutput | None = None
        self.start = time.perf_counter()
        try:  # submitted now, so a full queue or a bad request is an HTTP error before any byte is sent
            self.outputs = self.engine.generate(prompt_ids, self.sampling, selection=selection)
        except QueueFullError as e:
            raise APIError(429, str(e), "rate_limit_error", headers={"Retry-After": "1"}) from e
        except ValueError as e:
            raise APIError(400, str(e)) from e
        except KeyError as e:
            raise APIError(404, str(e.args[0]), "NotFoundError", "adapters", "adapter_not_found") from e

    async def first_output(self) -> None:
        """Wait for the first token (or an early error), so the adapters chosen are known before
        the response headers go out."""
        try:
            self._first = await anext(self.outputs)
        except BaseException:
            self.outputs.close()
            raise
        self._check(self._first)

    def _check(self, out: StepOutput) -> None:
        if out.adapters is not None:
            self.adapters = out.adapters
        if out.gate_entropy is not None:
            self.gate_entropy = out.gate_entropy
        if out.error:
            self.outputs.close()
            kind = "server_error" if out.error_status >= 500 else "invalid_request_error"
            raise APIError(out.error_status, out.error, kind)

    async def _outputs(self) -> AsyncIterator[StepOutput]:
        if self._first is not None:
            yield self._first
        async for out in self.outputs:
            self._check(out)
            yield out

    async def deltas(self) -> AsyncIterator[str]:
        start = first = self.start
        try:
            async for out in self._outputs():
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
        self.metrics.observe_adapters(self.adapters, self.gate_entropy)

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
    query = retrieval_query(messages, request.app.state.settings.retrieval_query)
    gen = Generation(request, "/v1/chat/completions", prompt_ids, body, query)
    await gen.first_output()
    rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model
    if not body.stream:
        await gen.run()
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text}, "logprobs": None,
                         "finish_reason": gen.finish_reason}],
            "usage": gen.usage(), "adapters": gen.adapters,
        }, headers=adapters_header(gen.adapters))

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    async def events() -> AsyncIterator[str]:
        yield sse({**chunk({"role": "assistant", "content": ""}), "adapters": gen.adapters})
        async for text in gen.deltas():
            yield sse(chunk({"content": text}))
        yield sse({**chunk({}, gen.finish_reason), "adapters": gen.adapters})  # with the gate's mean weights
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
            gens.append(Generation(request, "/v1/completions", tokenizer(p)["input_ids"], body, p))
        for g in gens:
            await g.first_output()
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
            "usage": usage, "adapters": gens[0].adapters,
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
