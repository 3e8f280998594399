"""/admin/adapters: upload, list, inspect, update the card of, and delete adapters while serving.

Auth (`Authorization: Bearer <MOLE_ADMIN_TOKEN>`) is checked by app.py's middleware through
admin_denial(), before any body is read. Every change of one name runs under that name's lock:
disk commit, then the engine (in its step thread), so two racing uploads give one 201 and one 409.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import weakref
from pathlib import Path

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from server.api.openai_routes import ready_engine
from server.api.protocol import APIError
from server.config import Settings
from server.lora.store import ADAPTER_FILES, AdapterExistsError, AdapterStore, describe, read_card
from server.lora.upload import (
    CheckedAdapter,
    UploadError,
    UploadTooLargeError,
    check_adapter,
    check_card,
    collect,
    single_threaded,
)

router = APIRouter(prefix="/admin")
NEAREST_K = 3
UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "adapter_config.json, adapter_model.safetensors, card.json; or one .zip/.tar.gz"},
        "name": {"type": "string", "description": "adapter name (default: the card's)"}}}}}}}


def admin_denial(settings: Settings, authorization: str | None) -> APIError | None:
    """None if the request may use /admin; else the error to answer (403 disabled, 401 bad token)."""
    if not settings.admin_token:
        return APIError(403, "The admin API is disabled: start the server with MOLE_ADMIN_TOKEN=<secret> to enable "
                             "it, then send `Authorization: Bearer <secret>`.", "permission_error",
                        code="admin_disabled")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), settings.admin_token.encode()):
        return APIError(401, "Missing or wrong admin token: send `Authorization: Bearer <MOLE_ADMIN_TOKEN>`.",
                        "authentication_error", code="invalid_admin_token", headers={"WWW-Authenticate": "Bearer"})
    return None


def _store(request: Request) -> AdapterStore:
    return request.app.state.store


def _lock(request: Request, name: str) -> asyncio.Lock:
    """The lock of one adapter name; it lives while some request holds or awaits it."""
    state = request.app.state
    if not hasattr(state, "admin_locks"):
        state.admin_locks = weakref.WeakValueDictionary()
    lock = state.admin_locks.get(name)
    if lock is None:
        lock = state.admin_locks[name] = asyncio.Lock()
    return lock


def _existing(request: Request, name: str) -> Path:
    store = _store(request)
    if name not in store:
        raise APIError(404, f"The adapter `{name}` does not exist.", "NotFoundError", "name", "adapter_not_found")
    return store.path(name)


def _nearest(engine, name: str) -> list[dict]:
    """The adapters whose retrieval keys are closest to `name`'s (possible duplicates); [] without retrieval."""
    if engine.retriever is None:
        return []
    try:
        hits = engine.retriever.nearest(name, NEAREST_K)
    except KeyError:
        return []
    return [{"name": n, "score": round(s, 4)} for n, s in hits]


def _register(engine, name: str, path: Path, checked: CheckedAdapter, key) -> tuple[float, list[dict]]:
    """In the engine thread: register the checked adapter and its key; (seconds the step loop was
    held, its nearest neighbours)."""
    start = time.perf_counter()
    engine.add_adapter(name, path, checked.weights, key)
    return time.perf_counter() - start, _nearest(engine, name)


def _card_key(engine, examples: list[str]):
    """The retrieval key of a card [dim], embedded here rather than in the step thread (None: no retrieval)."""
    return engine.retriever.card_key(examples) if engine.retriever is not None else None


async def _read_upload(request: Request, limit: int) -> tuple[list[tuple[str, bytes]], str | None]:
    """(file name, bytes) of each file part and the `name` field; 413 as soon as the body passes `limit`."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise UploadError("send the adapter as multipart/form-data: its files, or one .zip / .tar.gz")
    try:
        declared = int(request.headers.get("content-length") or 0)
    except ValueError as e:
        raise UploadError("invalid Content-Length") from e
    if declared > limit:
        raise UploadTooLargeError(f"the upload is {declared} bytes; the limit is {limit} (MOLE_MAX_UPLOAD_BYTES)")

    async def body():
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise UploadTooLargeError(f"the upload is over {limit} bytes (MOLE_MAX_UPLOAD_BYTES)")
            yield chunk

    try:
        form = await MultiPartParser(request.headers, body(), max_files=16, max_fields=16).parse()
    except MultiPartException as e:
        raise UploadError(f"malformed multipart body: {e.message}") from e
    try:
        # A part is known by its field name when that is an adapter file (curl -F card.json=@my.json),
        # else by its file name (several parts under one field, or an archive)
        parts = [(key if key in ADAPTER_FILES else item.filename or key, await item.read())
                 for key, item in form.multi_items() if isinstance(item, UploadFile)]
        name = form.get("name")
        return parts, name if isinstance(name, str) and name else None
    finally:
        await form.close()


def _upload_error(e: UploadError) -> APIError:
    return APIError(e.status, str(e), code=e.code)


@router.post("/adapters", status_code=201, openapi_extra=UPLOAD_SCHEMA)
async def upload_adapter(request: Request, replace: bool = False):
    engine = ready_engine(request)
    core, settings, store = engine.engine, request.app.state.settings, _store(request)
    base_names = {n.lower() for n in (Path(core.model.config.name_or_path or "").name, core.model_name) if n}
    try:
        parts, name = await _read_upload(request, settings.max_upload_bytes)
        files = await asyncio.to_thread(collect, parts, settings.max_uncompressed_bytes)
        checked = await asyncio.to_thread(single_threaded, check_adapter, files, name, core.model.lora_spec(),
                                          settings.max_lora_rank, base_names, settings.min_card_examples)
    except UploadError as e:
        raise _upload_error(e) from e
    name = checked.name
    key = await asyncio.to_thread(single_threaded, _card_key, core, checked.card["examples"])
    async with _lock(request, name):
        try:
            commit = await asyncio.to_thread(store.commit, name, checked.files, replace)
        except AdapterExistsError as e:
            raise APIError(409, f"The adapter `{name}` already exists; add ?replace=true to replace it.",
                           param="name", code="adapter_exists") from e
        try:
            load_s, nearest = await engine.run_in_engine(lambda e: _register(e, name, store.path(name), checked, key))
        except Exception as e:  # validated above, so only an I/O or embedder failure: undo the commit
            await asyncio.to_thread(commit.rollback)
            restore = (lambda c: c.add_adapter(name, store.path(name))) if commit.previous else \
                (lambda c: c.remove_adapter(name))
            await engine.run_in_engine(restore)
            raise APIError(422, f"the adapter `{name}` could not be loaded: {e}", code="invalid_adapter") from e
        await asyncio.to_thread(commit.finish)
        info = await asyncio.to_thread(describe, store.path(name))
    return JSONResponse({"object": "adapter", "name": name, "card": checked.card, **info, "nearest": nearest,
                         "load_s": round(load_s, 4), "replaced": commit.previous is not None}, status_code=201)


def _summary(store: AdapterStore, name: str, engine) -> dict | None:
    try:
        card = read_card(store.path(name))
    except (OSError, ValueError):  # deleted while listing, or a hand-edited card gone bad
        return None
    return {"name": name, "description": card.get("description", ""), "loaded": engine is not None and
            name in engine.engine.pool, "usage": engine.engine.adapter_usage[name] if engine is not None else 0}


@router.get("/adapters")
async def list_adapters(request: Request, offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=500)):
    store, engine = _store(request), request.app.state.engine
    names = await asyncio.to_thread(store.names)
    page = await asyncio.to_thread(lambda: [_summary(store, n, engine) for n in names[offset:offset + limit]])
    data = [s for s in page if s is not None]
    after = offset + limit
    return {"object": "list", "data": data, "total": len(names), "offset": offset, "limit": limit,
            "next_offset": after if after < len(names) else None}


@router.get("/adapters/{name}")
async def get_adapter(request: Request, name: str):
    path, engine = _existing(request, name), request.app.state.engine

    def read() -> dict:
        return {"card": read_card(path), "config": json.loads((path / "adapter_config.json").read_text()),
                **describe(path)}

    try:
        info = await asyncio.to_thread(read)
    except FileNotFoundError as e:  # deleted between the check and the read
        raise APIError(404, f"The adapter `{name}` does not exist.", "NotFoundError", "name",
                       "adapter_not_found") from e
    served = engine is not None and name in engine.engine.pool
    usage = engine.engine.adapter_usage[name] if engine is not None else 0
    return {"object": "adapter", "name": name, **info, "loaded": served, "usage": usage}


class CardUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str | None = None
    examples: list[str] | None = None


@router.patch("/adapters/{name}")
async def update_card(request: Request, name: str):
    engine = ready_engine(request)
    try:
        update = CardUpdate.model_validate_json(await request.body())
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise APIError(400, f"{where}: {first['msg']} (send JSON with description and/or examples)",
                       param=where) from e
    store, settings = _store(request), request.app.state.settings
    async with _lock(request, name):
        path = _existing(request, name)
        card = read_card(path)
        changes = update.model_dump(exclude_none=True)
        try:
            card = check_card({**card, **changes}, name, settings.min_card_examples)
        except UploadError as e:
            raise _upload_error(e) from e
        await asyncio.to_thread(store.write_card, name, card)
        key = await asyncio.to_thread(single_threaded, _card_key, engine.engine, card["examples"]) \
            if "examples" in changes else None

        def apply(e) -> list[dict]:
            if key is not None and name in e.pool:
                e.retriever.set_key(name, key)
            return _nearest(e, name)

        nearest = await engine.run_in_engine(apply)
    return {"object": "adapter", "name": name, "card": card, "nearest": nearest}


@router.delete("/adapters/{name}")
async def delete_adapter(request: Request, name: str):
    engine = ready_engine(request)
    async with _lock(request, name):
        _existing(request, name)
        # The engine first: new requests stop selecting it at once, running ones keep their slot.
        await engine.run_in_engine(lambda e: e.remove_adapter(name))
        await asyncio.to_thread(_store(request).delete, name)
    return {"id": name, "object": "adapter", "deleted": True}
