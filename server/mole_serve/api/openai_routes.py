"""/v1/chat/completions, /v1/completions, /v1/models in OpenAI's shapes (serving.py writes the
responses; here only what differs between the endpoints)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence

from fastapi import APIRouter, Request

from mole_serve.api.errors import APIError
from mole_serve.api.limits import check_prompt_chars
from mole_serve.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatLogprobs,
    CompletionRequest,
    ModelCard,
    ModelList,
    TextChoice,
    TextLogprobs,
    TokenLogprob,
    ToolCall,
    TopLogprob,
)
from mole_serve.api.serving import Generation, Shape, check_model, choice_makers, named_adapters, respond, start
from mole_serve.api.structured import ToolUse, output_constraint, template_messages, template_refusals
from mole_serve.engine.client import EngineClient
from mole_serve.engine.request import Logprob
from mole_serve.input_forms import PLAIN, form_prompts

router = APIRouter()


def _token(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def chat_logprobs(tokenizer, entries: list[Logprob]) -> ChatLogprobs:
    def top(token_id: int, logprob: float) -> dict:
        text = _token(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return ChatLogprobs(
        content=[
            TokenLogprob(**top(t, lp), top_logprobs=[TopLogprob(**top(a, alp)) for a, alp in alts])
            for t, lp, alts in entries
        ]
    )


def text_logprobs(tokenizer, entries: Sequence[Logprob | None], token_ids: list[int], offset: int) -> TextLogprobs:
    """The legacy shape over tokens `token_ids` (an entry None: no logprob, the first prompt token);
    each token's top dict holds the token itself too (vLLM's way: up to logprobs + 1 keys)."""
    out = TextLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for token_id, entry in zip(token_ids, entries):
        text = _token(tokenizer, token_id)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        out.token_logprobs.append(None if entry is None else entry[1])
        out.top_logprobs.append(
            None if entry is None else {**{_token(tokenizer, a): alp for a, alp in entry[2]}, text: entry[1]}
        )
    return out


def chat_shape(tokenizer, logprobs: bool, tool_use: ToolUse | None) -> Shape:
    """Chat choices; with tools, the answer is read as tool calls once whole, so a stream holds its
    text back and sends the calls (or the text, if it holds none) in its last chunk."""

    def pieces(g: Generation) -> ChatLogprobs | None:
        return chat_logprobs(tokenizer, g.take_logprobs()) if logprobs else None

    def answer(g: Generation) -> tuple[str | None, list[ToolCall] | None, str | None]:
        """(content, tool calls, finish reason)"""
        return tool_use.answer(g.text, g.finish_reason) if tool_use else (g.text, None, g.finish_reason)

    def message(i: int, g: Generation) -> ChatChoice:
        content, calls, finish = answer(g)
        called = {"tool_calls": calls} if calls else {}  # (absent, not null, from a text answer)
        return ChatChoice(
            index=i,
            message=AssistantMessage(role="assistant", content=content, **called),
            logprobs=chat_logprobs(tokenizer, g.logprobs) if logprobs else None,
            finish_reason=finish,
        )

    def delta(i: int, text: str, finish: str | None, g: Generation) -> ChatChoice | None:
        if tool_use is None:
            return ChatChoice(
                index=i, delta={"content": text} if text else {}, logprobs=pieces(g), finish_reason=finish
            )
        if finish is None:
            return None
        content, calls, finish = answer(g)
        whole: dict[str, str | list[dict]] = {"content": content} if content else {}
        if calls:
            whole["tool_calls"] = [{"index": k, **c.model_dump()} for k, c in enumerate(calls)]
        return ChatChoice(index=i, delta=whole, logprobs=pieces(g), finish_reason=finish)

    return Shape(
        "chatcmpl",
        "chat.completion",
        "chat.completion.chunk",
        choice=message,
        delta=delta,
        opening=lambda i: ChatChoice(
            index=i, delta={"role": "assistant", "content": ""}, logprobs=None, finish_reason=None
        ),
    )


def text_shape(prefixes: list[str], tokenizer, logprobs: bool) -> Shape:
    """/v1/completions; prefixes: what precedes each choice's answer (the prompt, with `echo`, whose
    tokens' logprobs then come first)."""

    def echoed(i: int, g: Generation) -> list[Logprob | None]:
        if not (logprobs and prefixes[i]):
            return []
        assert g.prompt_logprobs is not None  # echo with logprobs asks the engine for them
        return g.prompt_logprobs

    def whole(i: int, g: Generation) -> TextLogprobs | None:
        if not logprobs:
            return None
        echo = echoed(i, g)
        ids = [*g.prompt_ids[: len(echo)], *(t for t, _, _ in g.logprobs)]
        return text_logprobs(tokenizer, [*echo, *g.logprobs], ids, 0)

    opened: set[int] = set()  # the choices whose stream has begun (the echoed prompt goes first)

    def delta(i: int, text: str, finish: str | None, g: Generation) -> TextChoice:
        prefix = prefixes[i] if i not in opened else ""
        opened.add(i)
        entries = None
        if logprobs:
            echo = echoed(i, g) if prefix else []
            new = g.take_logprobs()
            ids = [*g.prompt_ids[: len(echo)], *(t for t, _, _ in new)]
            offset = 0 if prefix else len(prefixes[i]) + len(g.text) - len(text)
            entries = text_logprobs(tokenizer, [*echo, *new], ids, offset)
        return TextChoice(index=i, text=prefix + text, logprobs=entries, finish_reason=finish)

    return Shape(
        "cmpl",
        "text_completion",
        "text_completion",
        choice=lambda i, g: TextChoice(
            index=i, text=prefixes[i] + g.text, logprobs=whole(i, g), finish_reason=g.finish_reason
        ),
        delta=delta,
    )


def ready_engine(request: Request) -> EngineClient:
    engine = request.app.state.engine
    if engine is None:
        raise APIError(503, "the model is still loading; try again shortly", "service_unavailable")
    return engine


def retrieval_query(messages: list[dict], mode: str) -> str:
    """The text retrieval embeds: the last user turn, or every turn (settings.retrieval_query)."""
    if mode == "conversation":
        return "\n".join(m["content"] for m in messages if m["role"] != "system")
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def input_forms(request: Request, body: ChatCompletionRequest) -> set[str]:
    """The input forms other than plain that an adapter this request may run reads: the named
    adapters' forms, or (model `auto`) those of every adapter retrieval may choose."""
    catalog = request.app.state.catalog
    named = named_adapters(ready_engine(request), body)
    if named:
        return {form for a in named if (form := catalog.input_form(a.name)) != PLAIN}
    return catalog.input_forms() if body.model == "auto" else set()


def generations(
    request: Request,
    route: str,
    prompt_ids: list[int],
    body,
    query: str,
    grammar: str | None = None,
    prompts_by_form: dict[str, tuple[int, ...]] | None = None,
) -> list[Callable[[], Generation]]:
    """The makers of one prompt's choices (`n`, or completions' `best_of`), for serving.start."""
    state = request.app.state
    return choice_makers(
        lambda choice, first: Generation(
            ready_engine(request),
            state.settings,
            state.metrics,
            route,
            prompt_ids,
            body,
            query,
            grammar,
            prompts_by_form,
            choice,
            first,
        ),
        body.choices_generated(),
    )


async def start_chat(
    body: ChatCompletionRequest, request: Request, route: str
) -> tuple[list[Generation], ToolUse | None]:
    """A chat's prompt through the chat template, and its generations started (/v1/chat/completions,
    and /v1/responses, whose requests read as chat requests); the tool calls' reading, if any."""
    engine = ready_engine(request)
    template = engine.tokenizer.chat_template
    grammar, tool_use = output_constraint(body, template)
    messages, tools = template_messages(body, template)
    check_prompt_chars(
        sum(len(m["content"]) for m in messages) + len(json.dumps(tools or [])),
        engine.max_token_chars,
        engine.max_model_len,
    )
    # off the event loop: a long prompt must not stall every other request (and /health)
    with template_refusals():
        prompt_ids = (
            await asyncio.to_thread(
                engine.tokenizer.apply_chat_template,
                messages,
                tools=tools,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )
        )["input_ids"]
    # the prompt in each input form an adapter it may run reads, built once (usually none)
    forms = input_forms(request, body)
    by_form = await asyncio.to_thread(form_prompts, engine.tokenizer, messages, forms, tools=tools) if forms else {}
    query = retrieval_query(messages, request.app.state.settings.retrieval_query)
    return await start(generations(request, route, prompt_ids, body, query, grammar, by_form)), tool_use


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    gens, tool_use = await start_chat(body, request, "/v1/chat/completions")
    return await respond(
        chat_shape(ready_engine(request).tokenizer, bool(body.logprobs), tool_use), body, gens, request
    )


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    engine = ready_engine(request)
    prompts = body.prompts()
    vocab = len(engine.tokenizer)
    for p in prompts:
        if isinstance(p, str):
            check_prompt_chars(len(p), engine.max_token_chars, engine.max_model_len)
        elif not all(0 <= t < vocab for t in p):
            raise APIError(400, f"a prompt token id is outside the vocabulary [0, {vocab})", param="prompt")
    ids = await asyncio.to_thread(
        lambda: [engine.tokenizer(p)["input_ids"] if isinstance(p, str) else p for p in prompts]
    )
    texts = [p if isinstance(p, str) else engine.tokenizer.decode(p) for p in prompts]
    gens = await start(
        [make for i, text in enumerate(texts) for make in generations(request, "/v1/completions", ids[i], body, text)]
    )
    return await respond(
        text_shape(
            [t if body.echo else "" for t in texts for _ in range(body.n)], engine.tokenizer, body.logprobs is not None
        ),
        body,
        gens,
        request,
    )


def model_card(engine: EngineClient, model_id: str, created: int, gate_refused: str | None = None) -> ModelCard:
    """The base model (no parent), `auto` (with how it composes what it retrieves, and why the
    store's gate is not served when it was refused), or an adapter (parent: the base, as vLLM lists LoRAs)."""
    base = engine.model_name
    card = ModelCard(id=model_id, created=created, root=base, parent=None if model_id == base else base)
    if model_id == "auto":
        card.routing = "gate" if engine.has_gate else "mixture"
        card.routing_note = None if engine.has_gate else gate_refused
    return card


@router.get("/v1/models")
async def list_models(request: Request):
    engine, created, catalog = ready_engine(request), int(time.time()), request.app.state.catalog
    ids = [engine.model_name, "auto", *catalog.names]
    return ModelList(data=[model_card(engine, i, created, catalog.gate_refused) for i in ids]).model_dump(mode="json")


@router.get("/v1/models/{model_id}")
async def retrieve_model(model_id: str, request: Request):
    engine = ready_engine(request)
    check_model(engine, model_id)
    card = model_card(engine, model_id, int(time.time()), request.app.state.catalog.gate_refused)
    return card.model_dump(mode="json")
