"""vLLM's own routes, for operators and tools that come from it, answered as vLLM answers them (errors
in OpenAI's shape): runtime LoRA loading, POST /v1/load_lora_adapter and /v1/unload_lora_adapter,
and the tokenizer, POST /tokenize and /detokenize.

A loaded adapter takes the admin upload's way (admin_routes.upload_adapter): its folder's files are
checked as an upload's and committed to the store by the catalog's transaction, so it is served by
name and retrieved by `auto` (its card's examples) at once, and outlives a restart; the folder it
came from is left as it was. An unload is DELETE /admin/adapters/{name}. Only folders under
MOLE_LORA_LOAD_ROOTS load, their symlinks resolved first; with none set both routes answer 403. They
take the admin token when one is set, else the API key as every /v1 route (app.py's authorize calls
lora_denial). SGLang's /load_lora_adapter and /unload_lora_adapter take the same bodies but answer
JSON ({success, error_message, loaded_adapters}, 400 for any failure), so they are not aliased here.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import PlainTextResponse
from fastapi.routing import APIRoute

from mole_serve.api.admin_routes import admin_denial, upload_slot
from mole_serve.api.auth import api_key_denial
from mole_serve.api.errors import APIError
from mole_serve.api.openai_routes import ready_engine
from mole_serve.api.protocol import (
    ChatCompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoRAAdapterRequest,
)
from mole_serve.api.serving import check_model
from mole_serve.api.structured import template_messages, template_refusals
from mole_serve.config import Settings
from mole_serve.errors import AdapterNotFound, AlreadyExists
from mole_serve.library.store import ADAPTER_FILES, CARD_FILE, PICKLED_WEIGHTS, WEIGHTS_FILE
from mole_serve.library.upload import UploadError, UploadTooLargeError, single_threaded

LORA_ROUTES = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
TOKENIZER_ROUTES = ("/tokenize", "/detokenize")


def lora_denial(settings: Settings, authorization: str | None) -> APIError | None:
    """The admin token when one is set (these routes change the library, as /admin does), else the
    API key of every /v1 route."""
    if settings.admin_token:
        return admin_denial(settings, authorization)
    return api_key_denial(settings.api_key, authorization)


def _loading_enabled(request: Request) -> None:
    """403 unless MOLE_LORA_LOAD_ROOTS is set (a dependency: it answers before the body is checked)."""
    if not request.app.state.settings.lora_load_roots:
        raise APIError(
            403,
            "Loading LoRA adapters by path is disabled: start the server with "
            "MOLE_LORA_LOAD_ROOTS=<folder>[:<folder>...] naming the folders it may load from.",
            "permission_error",
            code="lora_loading_disabled",
        )


def inside_roots(path: str | Path, roots: list[Path]) -> Path:
    """`path` with every symlink resolved, when that lies under one of `roots` (resolved too); else 403.
    Resolved first, so a link inside a root to a folder outside it is refused."""
    real = Path(os.path.realpath(path))
    if any(real.is_relative_to(os.path.realpath(root)) for root in roots):
        return real
    raise APIError(
        403,
        f"{str(path)!r} is outside the folders this server loads adapters from "
        f"(MOLE_LORA_LOAD_ROOTS: {os.pathsep.join(map(str, roots))}).",
        "permission_error",
        param="lora_path",
        code="lora_path_not_allowed",
    )


# The card of a folder without one (a PEFT adapter as trained): served by name, never retrieved by `auto`.
CARDLESS = b'{"auto": false}'


def read_adapter_folder(path: str, roots: list[Path], limit: int) -> dict[str, bytes]:
    """The ADAPTER_FILES of the folder at `path`, as an upload brings them (CARDLESS when it has no
    card.json): the folder and each file under `roots` once resolved, together at most `limit`
    bytes (MOLE_MAX_UPLOAD_BYTES)."""
    folder = inside_roots(path, roots)
    try:
        if not folder.exists():
            raise APIError(
                404, f"No adapter found at {path!r}: it does not exist.", param="lora_path", code="not_found"
            )
        present = [f for f in ADAPTER_FILES if (folder / f).is_file()]
        missing = [f for f in ADAPTER_FILES if f not in present and f != CARD_FILE]
        if missing:
            pickled = WEIGHTS_FILE in missing and (folder / PICKLED_WEIGHTS).is_file()
            hint = f"; `mole-serve convert` writes {WEIGHTS_FILE} from its {PICKLED_WEIGHTS}" if pickled else ""
            raise UploadError(f"{path!r} is not an adapter folder: it has no {', '.join(missing)}{hint}", "lora_path")
        files = {name: inside_roots(folder / name, roots) for name in present}
        size = sum(f.stat().st_size for f in files.values())
        if size > limit:
            raise UploadTooLargeError(
                f"the adapter's files are {size} bytes; the limit is {limit} (MOLE_MAX_UPLOAD_BYTES)", "lora_path"
            )
        read = {name: f.read_bytes() for name, f in files.items()}
        return {CARD_FILE: CARDLESS, **read}

    except OSError as e:  # a folder or file the server may not read
        raise UploadError(f"{path!r} cannot be read: {e.strerror or e}", "lora_path") from e


lora_router = APIRouter(dependencies=[Depends(_loading_enabled)])


@lora_router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> str:
    """The adapter folder at `lora_path`, as `lora_name`: checked and committed as an upload (one
    of MOLE_MAX_CONCURRENT_UPLOADS), served at once. `load_inplace` replaces an adapter of that name."""
    engine, settings = ready_engine(request), request.app.state.settings
    async with upload_slot(request):
        files = await asyncio.to_thread(
            read_adapter_folder, body.lora_path, settings.lora_load_roots, settings.max_upload_bytes
        )
        catalog = request.app.state.catalog
        checked = await asyncio.to_thread(single_threaded, catalog.check, files, body.lora_name)
        try:
            await catalog.upload(checked, body.load_inplace, engine)
        except AlreadyExists as e:  # vLLM's answer (the same files again are answered as loaded)
            raise APIError(
                400,
                f"The lora adapter '{body.lora_name}' has already been loaded. To replace it, set "
                "'load_inplace' to true.",
                param="lora_name",
                code=e.code,
            ) from e
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@lora_router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> str:
    """As DELETE /admin/adapters/{lora_name}: requests stop selecting it at once, its store copy goes."""
    engine = ready_engine(request)
    try:
        await request.app.state.catalog.delete(body.lora_name, engine)
    except AdapterNotFound as e:
        raise APIError(
            404, f"The lora adapter '{body.lora_name}' cannot be found.", param="lora_name", code=e.code
        ) from e
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."


class LengthBoundedRoute(APIRoute):
    """A JSON route outside /v1, whose body the gate does not read whole within MOLE_MAX_REQUEST_MB
    (api/gate.py): its Content-Length is held to the same limit before FastAPI reads the body, which
    the HTTP server ends at that length."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            limit = int(request.app.state.settings.max_request_mb * (1 << 20))
            declared = request.headers.get("content-length")
            if declared is None:
                raise APIError(411, "Send the request body with a Content-Length.", code="length_required")
            if not declared.isdigit() or int(declared) > limit:
                raise APIError(
                    413, f"The request body is over {limit} bytes (MOLE_MAX_REQUEST_MB).", code="request_too_large"
                )
            return await handle(request)

        return bounded


tokenizer_router = APIRouter(route_class=LengthBoundedRoute)


def chat_text(tokenizer: Any, body: TokenizeRequest) -> str:
    """The messages and tools as the chat route renders them (structured.template_messages)."""
    continuing = body.continue_final_message
    generation = not continuing if body.add_generation_prompt is None else body.add_generation_prompt
    if continuing and generation:
        raise APIError(
            400,
            "Cannot set both `continue_final_message` and `add_generation_prompt` to true.",
            param="continue_final_message",
        )
    assert body.messages is not None  # (the route's branch)
    chat = ChatCompletionRequest(messages=body.messages, tools=body.tools)
    messages, tools = template_messages(chat, tokenizer.chat_template)
    try:
        with template_refusals():
            return tokenizer.apply_chat_template(
                messages,
                tools=tools,
                add_generation_prompt=generation,
                continue_final_message=continuing,
                tokenize=False,
            )
    except ValueError as e:  # a final message the template does not render as given cannot be continued
        if not continuing:
            raise
        raise APIError(400, str(e), param="continue_final_message") from e


@tokenizer_router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    engine = ready_engine(request)
    if body.model is not None:
        check_model(engine, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(
            400, "Send either `prompt` or `messages`.", param="prompt" if body.prompt is None else "messages"
        )
    tokenizer = engine.tokenizer
    if body.prompt is not None:
        text, special = body.prompt, body.add_special_tokens is not False
    else:
        text, special = await asyncio.to_thread(chat_text, tokenizer, body), bool(body.add_special_tokens)

    def encode() -> TokenizeResponse:
        ids = tokenizer(text, add_special_tokens=special)["input_ids"]
        strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strs)

    return await asyncio.to_thread(encode)  # off the event loop: a long prompt must not stall the others


@tokenizer_router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    engine = ready_engine(request)
    if body.model is not None:
        check_model(engine, body.model)
    vocab = len(engine.tokenizer)
    if any(t >= vocab for t in body.tokens):
        raise APIError(400, f"a token id is outside the vocabulary [0, {vocab})", param="tokens")
    return DetokenizeResponse(prompt=await asyncio.to_thread(engine.tokenizer.decode, body.tokens))
