"""What /v1/chat/completions and /v1/completions share: the request to the engine (adapter
selection, sampling), one Generation per prompt, and the response written once for both: the
envelope, the SSE stream, include_usage, [DONE]. The routes only say how a choice looks."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mole_serve.api.errors import APIError
from mole_serve.api.gate import DISCONNECTED
from mole_serve.api.metrics import Metrics
from mole_serve.api.protocol import ChatChoice, CompletionEnvelope, MergeOptions, SamplingFields, TextChoice, Usage
from mole_serve.config import Settings
from mole_serve.engine.client import EngineClient, OutputStream
from mole_serve.engine.request import Logprob, SamplingParams, StepOutput
from mole_serve.errors import InvalidRequest, ModelNotFound, MoleError, ReplicaLost
from mole_serve.routing.types import AdapterRef, MergeSpec, Selection


def check_model(client: EngineClient, model_id: str) -> None:
    """A model id is the base model's, `auto`, or an adapter's name; anything else is a 404."""
    if model_id not in ("auto", client.model_name) and not client.has_adapter(model_id):
        raise ModelNotFound(f"The model `{model_id}` does not exist.", "model")


def named_adapters(client: EngineClient, body: SamplingFields) -> tuple[AdapterRef, ...]:
    """The adapters a request names: `adapters`, else `model` when it is an adapter's name."""
    explicit = tuple(AdapterRef(c.name, c.weight) for c in body.adapter_choices())
    if body.model not in ("auto", client.model_name):  # an adapter's name
        explicit = explicit or (AdapterRef(body.model),)
    return explicit


def build_selection(
    client: EngineClient,
    settings: Settings,
    body: SamplingFields,
    query: str,
    prompts_by_form: dict[str, tuple[int, ...]] | None = None,
) -> Selection | None:
    """How the engine picks this request's adapters, from `model` and the extension fields
    (docs/architecture.md section 2): `auto` retrieves (unless `adapters` names the candidates), an
    adapter's name is that adapter, the base model's id is no adapter unless `adapters` names some.
    prompts_by_form: the prompt in each input form its adapters may read (chat only, input_forms.py)."""
    check_model(client, body.model)
    explicit = named_adapters(client, body)
    if body.model != "auto" and not explicit:
        return None
    composition = body.composition or ("gate" if client.has_gate else "mixture")
    merge = body.merge or MergeOptions()
    return Selection(
        composition,
        explicit,
        query if body.model == "auto" else None,
        body.retrieval_top_k or settings.retrieval_top_k,
        MergeSpec(merge.strategy, merge.density, merge.seed),
        prompts_by_form=prompts_by_form or {},
    )


def sampling_params(
    client: EngineClient, body: SamplingFields, num_prompt_tokens: int, grammar: str | None = None
) -> SamplingParams:
    window = client.max_model_len
    max_tokens = body.token_limit() or window - num_prompt_tokens
    if num_prompt_tokens + max(max_tokens, 1) > window:  # (a prompt that fills the window leaves no room)
        raise APIError(
            400,
            f"This model's maximum context length is {window} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the messages, "
            f"{max_tokens} in the completion).",
            param="messages",
            code="context_length_exceeded",
        )
    if body.min_tokens > max_tokens:
        raise InvalidRequest(f"min_tokens ({body.min_tokens}) is over max_tokens ({max_tokens})", "min_tokens")
    vocab = len(client.tokenizer) if body.logit_bias or body.stop_token_ids else 0
    bias = {_bias_token(key, vocab): value for key, value in (body.logit_bias or {}).items()}
    for token in body.stop_token_ids or ():
        if token >= vocab:
            raise InvalidRequest(f"stop_token_ids: {token} is outside the vocabulary [0, {vocab})", "stop_token_ids")
    logprobs, prompt_logprobs = body.logprob_counts()
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        logit_bias=tuple(bias.items()),
        min_tokens=body.min_tokens,
        seed=body.seed,
        stop=body.stop_list(),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        grammar=grammar,
    )


def _bias_token(key: str, vocab: int) -> int:
    """A logit_bias key (decimal digits) as a token id of the vocabulary [0, vocab), else a 400."""
    digits = key.lstrip("0") or "0"
    if len(digits) > len(str(vocab)) or int(digits) >= vocab:  # (int() refuses thousands of digits)
        raise InvalidRequest(f"logit_bias: the key {key!r} is outside the vocabulary [0, {vocab})", "logit_bias")
    return int(digits)


RESENDS = 2  # times a non-streamed request is run again after its replica died


class Generation:
    """One engine request seen from HTTP: runs it, times it, counts it in the metrics."""

    outputs: OutputStream  # the engine request's, submitted again on a resend

    def __init__(
        self,
        client: EngineClient,
        settings: Settings,
        metrics: Metrics,
        route: str,
        prompt_ids: list[int],
        body: SamplingFields,
        query: str,
        grammar: str | None = None,
        prompts_by_form: dict[str, tuple[int, ...]] | None = None,
        choice: int = 0,
        follows: Generation | None = None,
    ) -> None:
        """choice: which of the prompt's `n` (or `best_of`) choices this is; follows: its first
        choice, whose prompt KV the engine reuses."""
        self.client, self.metrics, self.route, self.prompt_ids = client, metrics, route, prompt_ids
        self.selection = build_selection(client, settings, body, query, prompts_by_form)
        sampling = sampling_params(client, body, len(prompt_ids), grammar)
        if sampling.seed is not None and choice:  # seeded choices differ from each other, as vLLM's
            sampling = dataclasses.replace(sampling, seed=sampling.seed + choice)
        if ranks_choices(body) and sampling.logprobs is None:  # best_of ranks by the tokens' logprobs
            sampling = dataclasses.replace(sampling, logprobs=0)
        self.sampling = sampling
        self.choice = choice
        self.follows = follows.outputs.request_id if follows is not None else None
        self.prompt_only = body.prompt_only()  # echo with max_tokens 0: the one generated token is dropped
        self.adapters: list[dict] = []  # the engine's report: names, weights, scores, gate weights
        self.gate_entropy: float | None = None
        self.start = time.perf_counter()
        self.first_token_at: float | None = None  # of the first attempt: a resend does not time it again
        self._submit()

    def _submit(self) -> None:
        self.text, self.completion_tokens = "", 0
        self.finish_reason: str | None = None
        self.prompt_tokens = len(self.prompt_ids)
        self.logprobs: list[Logprob] = []  # the generated tokens', when asked
        self.prompt_logprobs: list[Logprob | None] | None = None  # the prompt tokens', when asked
        self._logprobs_sent = 0
        self._first: StepOutput | None = None
        # submitted now, so a full queue or a bad request is an HTTP error before any byte is sent
        self.outputs = self.client.generate(self.prompt_ids, self.sampling, self.selection, follows=self.follows)

    async def first_output(self) -> None:
        """Wait for the first token (or an early error), so the adapters chosen are known before
        the response headers go out."""
        try:
            self._first = await anext(aiter(self.outputs))
        except BaseException:
            self.outputs.close()
            raise
        self._check(self._first)

    def _check(self, out: StepOutput) -> None:
        if out.num_prompt_tokens:  # the engine's count: a prompt in another input form differs
            self.prompt_tokens = out.num_prompt_tokens
        if out.adapters is not None:
            self.adapters = out.adapters
        if out.gate_entropy is not None:
            self.gate_entropy = out.gate_entropy
        if out.error is not None:
            self.outputs.close()
            raise out.error

    async def _outputs(self) -> AsyncIterator[StepOutput]:
        if self._first is not None:
            yield self._first
        async for out in self.outputs:
            self._check(out)
            yield out

    async def deltas(self) -> AsyncIterator[str]:
        try:
            async for out in self._outputs():
                if self.first_token_at is None and out.num_output_tokens:
                    self.first_token_at = time.perf_counter()
                    self.metrics.ttft.observe(self.first_token_at - self.start)
                if out.prompt_logprobs is not None:
                    self.prompt_logprobs = out.prompt_logprobs
                if out.finished:
                    assert out.finish_reason is not None  # a finished output has its reason
                    self.finish_reason = "length" if self.prompt_only else out.finish_reason.value
                if self.prompt_only:
                    continue
                self.completion_tokens = max(self.completion_tokens, out.num_output_tokens)
                self.text += out.text
                if out.logprob is not None:
                    self.logprobs.append(out.logprob)
                if out.text:
                    yield out.text
        finally:  # also when the client disconnects mid-stream (the task is cancelled)
            self.outputs.close()
        end = time.perf_counter()
        self.metrics.latency.labels(self.route).observe(end - self.start)
        if self.completion_tokens > 1 and self.first_token_at is not None:
            self.metrics.tpot.observe((end - self.first_token_at) / (self.completion_tokens - 1))
        self.metrics.prompt_tokens.inc(self.prompt_tokens)
        self.metrics.completion_tokens.inc(self.completion_tokens)
        self.metrics.observe_adapters(self.adapters, self.gate_entropy)

    def take_logprobs(self) -> list[Logprob]:
        """The generated tokens' logprobs not yet streamed."""
        new = self.logprobs[self._logprobs_sent :]
        self._logprobs_sent = len(self.logprobs)
        return new

    async def run(self) -> None:
        """The whole answer, for a non-streamed response: none of it was sent, so a request whose
        replica died mid-way (Ray) runs again from the start, on another replica."""
        for resend in range(RESENDS + 1):
            try:
                async for _ in self.deltas():
                    pass
                return
            except ReplicaLost:
                if resend == RESENDS:
                    raise
                self._submit()
                await self.first_output()

    def cumulative_logprob(self) -> float:
        return sum(lp for _, lp, _ in self.logprobs)


def ranks_choices(body: SamplingFields) -> bool:
    """Whether more choices are generated than returned (`best_of` > `n`), ranked by logprob."""
    return body.choices_generated() > body.n


def choice_makers(make: Callable[[int, Generation | None], Generation], count: int) -> list[Callable[[], Generation]]:
    """The makers of one prompt's `count` choices for start(): make(choice, first choice or None).
    The first is submitted before the rest, which follow it to share its prompt's KV blocks."""
    made: list[Generation] = []

    def one(choice: int) -> Generation:
        made.append(make(choice, made[0] if made else None))
        return made[-1]

    return [functools.partial(one, j) for j in range(count)]


def best_choices(gens: list[Generation], generated: int, kept: int) -> list[Generation]:
    """Of each prompt's `generated` finished choices (consecutive in gens), the `kept` with the
    highest cumulative logprob, in that order (OpenAI's best_of)."""
    groups = [gens[i : i + generated] for i in range(0, len(gens), generated)]
    return [g for group in groups for g in sorted(group, key=Generation.cumulative_logprob, reverse=True)[:kept]]


async def start(gens_from: list[Callable[[], Generation]]) -> list[Generation]:
    """Submit every prompt and wait for each first output; on a refusal (an error kind, which the
    app answers through api/errors.py's table), release what was submitted."""
    gens: list[Generation] = []
    try:
        for make in gens_from:
            gens.append(make())
        for g in gens:
            await g.first_output()
    except BaseException:
        for g in gens:
            g.outputs.close()
        raise
    return gens


@dataclass
class Shape:
    """How one endpoint's response looks: its object names and its choices."""

    id_prefix: str
    object: str
    chunk_object: str
    choice: Callable[[int, Generation], ChatChoice | TextChoice]  # the whole answer of prompt i
    delta: Callable[[int, str, str | None, Generation], ChatChoice | TextChoice | None]  # a streamed piece of
    # prompt i (text, finish reason; the generation, for the logprobs of its tokens since the last piece);
    # None: held back
    # choice i's first piece, all sent in a first chunk before any text (chat: the role)
    opening: Callable[[int], ChatChoice | TextChoice] | None = None


def total_usage(gens: list[Generation]) -> Usage:
    """Every generated token, and each prompt once (not once per choice), as OpenAI counts them."""
    prompt = sum(g.prompt_tokens for g in gens if g.choice == 0)
    completion = sum(g.completion_tokens for g in gens)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def sse(payload: CompletionEnvelope | str) -> str:
    data = payload if isinstance(payload, str) else payload.model_dump_json(exclude_unset=True)
    return f"data: {data}\n\n"


def adapters_header(report: list[dict]) -> dict[str, str]:
    return {"x-mole-adapters": ",".join(f"{a['name']}={a['weight']:.4g}" for a in report)}


async def close_when_gone(request: Request, gens: list[Generation]) -> None:
    """A non-streaming caller that leaves (timeout, closed socket) is only noticed when its answer
    is written: wait for its disconnect (gate.RequestGate signals it) and end its requests, which
    free their batch places within a step."""
    gone = request.scope.get(DISCONNECTED)
    if gone is not None:
        await gone.wait()
        for g in gens:
            g.outputs.close()


async def run_to_end(gens: list[Generation], request: Request) -> None:
    """Every generation whole, for a non-streamed answer; ended early if its caller leaves."""
    watcher = asyncio.create_task(close_when_gone(request, gens))
    try:
        for g in gens:
            await g.run()
    finally:
        watcher.cancel()


async def respond(shape: Shape, body: SamplingFields, gens: list[Generation], request: Request) -> Response:
    """The whole response, or its SSE stream, for generations already started."""
    rid, created = f"{shape.id_prefix}-{uuid.uuid4().hex}", int(time.time())
    header = adapters_header(gens[0].adapters)

    def envelope(obj: str, choices: list, **extra) -> CompletionEnvelope:
        return CompletionEnvelope(id=rid, object=obj, created=created, model=body.model, choices=choices, **extra)

    if not body.stream:  # (a streaming response notices a departed client when it next writes)
        await run_to_end(gens, request)
        usage = total_usage(gens)  # (best_of: of every choice generated)
        if ranks_choices(body):
            gens = best_choices(gens, body.choices_generated(), body.n)
        whole = envelope(
            shape.object, [shape.choice(i, g) for i, g in enumerate(gens)], usage=usage, adapters=gens[0].adapters
        )
        return JSONResponse(whole.model_dump(mode="json", exclude_unset=True), headers=header)

    async def events() -> AsyncIterator[str]:
        if shape.opening is not None:
            opening = [shape.opening(i) for i in range(len(gens))]
            yield sse(envelope(shape.chunk_object, opening, adapters=gens[0].adapters))
        try:
            for i, g in enumerate(gens):  # one prompt after the other: choices keep their order
                async for text in g.deltas():
                    piece = shape.delta(i, text, None, g)
                    if piece is not None:
                        yield sse(envelope(shape.chunk_object, [piece]))
                # the last chunk of a prompt carries its adapters again, with the gate's mean weights
                yield sse(envelope(shape.chunk_object, [shape.delta(i, "", g.finish_reason, g)], adapters=g.adapters))
        except MoleError as e:  # the status is sent: the error goes as an event (the openai client raises it)
            yield sse(json.dumps(APIError.of(e).body()))
            return
        if body.stream_options and body.stream_options.include_usage:
            yield sse(envelope(shape.chunk_object, [], usage=total_usage(gens)))
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=header)
