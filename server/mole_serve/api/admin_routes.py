"""/admin/adapters: upload, list, inspect, update the card of, and delete adapters while serving.

Auth (`Authorization: Bearer <MOLE_ADMIN_TOKEN>`) is checked by app.py's middleware through
admin_denial(), before any body is read. Changes go through the catalog (library/catalog.py),
which runs each as a transaction over the store, the registry and the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from mole_serve.api.auth import presents
from mole_serve.api.errors import APIError
from mole_serve.api.openai_routes import ready_engine
from mole_serve.config import Settings
from mole_serve.engine.client import EngineClient
from mole_serve.errors import AdapterNotFound, Overloaded
from mole_serve.library.store import ADAPTER_FILES, CONFIG_FILE, AdapterStore, describe, parse_json, read_card
from mole_serve.library.upload import UploadError, UploadTooLargeError, collect, single_threaded

router = APIRouter(prefix="/admin")
UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "minItems": 1,
                            "description": (
                                "adapter_config.json, adapter_model.safetensors, card.json; or one .zip/.tar.gz"
                            ),
                        },
                        "name": {"type": "string", "description": "adapter name (default: the card's)"},
                    },
                }
            }
        },
    }
}


def admin_denial(settings: Settings, authorization: str | None) -> APIError | None:
    """None if the request may use /admin; else the error to answer (403 disabled, 401 bad token)."""
    if not settings.admin_token:
        return APIError(
            403,
            "The admin API is disabled: start the server with MOLE_ADMIN_TOKEN=<secret> to enable "
            "it, then send `Authorization: Bearer <secret>`.",
            "permission_error",
            code="admin_disabled",
        )
    if not presents(authorization, settings.admin_token):
        return APIError(
            401,
            "Missing or wrong admin token: send `Authorization: Bearer <MOLE_ADMIN_TOKEN>`.",
            "authentication_error",
            code="invalid_admin_token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return None


def _store(request: Request) -> AdapterStore:
    return request.app.state.store


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
        parts = [
            (key if key in ADAPTER_FILES else item.filename or key, await item.read())
            for key, item in form.multi_items()
            if isinstance(item, UploadFile)
        ]
        name = form.get("name")
        return parts, name if isinstance(name, str) and name else None
    finally:
        await form.close()


@contextlib.asynccontextmanager
async def upload_slot(request: Request) -> AsyncIterator[None]:
    """One of the app's MOLE_MAX_CONCURRENT_UPLOADS, held while an upload is read, checked and
    committed; none free is a 429. (The semaphore is made on the event loop at first use.)"""
    state = request.app.state
    slots = getattr(state, "upload_slots", None)
    if slots is None:
        slots = state.upload_slots = asyncio.Semaphore(state.settings.max_concurrent_uploads)
    if slots.locked():
        raise Overloaded(
            f"{state.settings.max_concurrent_uploads} uploads are in progress (MOLE_MAX_CONCURRENT_UPLOADS); "
            "retry shortly",
            code="too_many_uploads",
        )
    async with slots:
        yield


@router.post("/adapters", status_code=201, openapi_extra=UPLOAD_SCHEMA)
async def upload_adapter(request: Request, replace: bool = False):
    """Checked whole off the step thread, then committed and served by the catalog. At most
    MOLE_MAX_CONCURRENT_UPLOADS at once, each holding its upload in memory: one more is a 429."""
    engine, settings = ready_engine(request), request.app.state.settings
    async with upload_slot(request):
        parts, name = await _read_upload(request, settings.max_upload_bytes)
        files = await asyncio.to_thread(collect, parts, settings.max_uncompressed_bytes)
        catalog = request.app.state.catalog
        checked = await asyncio.to_thread(single_threaded, catalog.check, files, name)
        done = await catalog.upload(checked, replace, engine)
    return JSONResponse(
        {
            "object": "adapter",
            "name": done.name,
            "card": done.card,
            **done.info,
            "nearest": done.nearest,
            "load_s": round(done.load_s, 6),
            "replaced": done.replaced,
        },
        status_code=201,
    )


def _summary(store: AdapterStore, name: str, engine: EngineClient | None) -> dict | None:
    try:
        card = read_card(store.path(name))
    except (OSError, ValueError):  # deleted while listing, or a hand-edited card gone bad
        return None
    return {
        "name": name,
        "description": card.get("description", ""),
        "loaded": engine is not None and engine.has_adapter(name),
        "usage": engine.adapter_usage(name) if engine is not None else 0,
    }


@router.get("/adapters")
async def list_adapters(request: Request, offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=500)):
    store, engine = _store(request), request.app.state.engine
    names = await asyncio.to_thread(store.names)
    page = await asyncio.to_thread(lambda: [_summary(store, n, engine) for n in names[offset : offset + limit]])
    data = [s for s in page if s is not None]
    after = offset + limit
    return {
        "object": "list",
        "data": data,
        "total": len(names),
        "offset": offset,
        "limit": limit,
        "next_offset": after if after < len(names) else None,
        # stored adapters that did not validate at start-up and are not served, with why (catalog.failed)
        "failed": [
            {"name": name, "error": why}
            for name, why in sorted(getattr(request.app.state.catalog, "failed", {}).items())
        ],
    }


@router.get("/adapters/{name}")
async def get_adapter(request: Request, name: str):
    path, engine = _store(request).existing(name), request.app.state.engine

    def read() -> dict:
        config = parse_json((path / CONFIG_FILE).read_bytes(), f"{name}/{CONFIG_FILE}")
        return {"card": read_card(path), "config": config, **describe(path)}

    try:
        info = await asyncio.to_thread(read)
    except FileNotFoundError as e:  # deleted between the check and the read
        raise AdapterNotFound(f"The adapter `{name}` does not exist.", "name") from e
    served = engine is not None and engine.has_adapter(name)
    usage = engine.adapter_usage(name) if engine is not None else 0
    return {"object": "adapter", "name": name, **info, "loaded": served, "usage": usage}


class CardUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str | None = None
    examples: list[str] | None = None


@router.patch(
    "/adapters/{name}",
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": CardUpdate.model_json_schema()}}}
    },
)
async def update_card(request: Request, name: str):
    """The card's description and/or examples (new examples: a new retrieval key at once). The body
    is read by hand, not as a parameter, so a bad one is a 400 naming the field."""
    ready_engine(request)  # 503 while loading: the catalog comes with the engine
    try:
        update = CardUpdate.model_validate_json(await request.body())
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise APIError(400, f"{where}: {first['msg']} (send JSON with description and/or examples)", param=where) from e
    card, nearest = await request.app.state.catalog.update_card(name, update.model_dump(exclude_none=True))
    return {"object": "adapter", "name": name, "card": card, "nearest": nearest}


@router.delete("/adapters/{name}")
async def delete_adapter(request: Request, name: str):
    engine = ready_engine(request)
    await request.app.state.catalog.delete(name, engine)
    return {"id": name, "object": "adapter", "deleted": True}
