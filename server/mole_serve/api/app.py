"""create_app: the FastAPI app around an engine that loads in the background (503 until ready)."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from mole_serve.api.admin_routes import admin_denial
from mole_serve.api.admin_routes import router as admin_router
from mole_serve.api.auth import api_key_denial
from mole_serve.api.errors import APIError
from mole_serve.api.gate import RequestGate
from mole_serve.api.metrics import Metrics
from mole_serve.api.openai_routes import router as openai_router
from mole_serve.api.openapi import truthful_openapi
from mole_serve.api.protocol import MESSAGE_ROLES
from mole_serve.api.responses_routes import router as responses_router
from mole_serve.api.vllm_routes import LORA_ROUTES, TOKENIZER_ROUTES, lora_denial, lora_router, tokenizer_router
from mole_serve.config import Settings
from mole_serve.errors import MoleError
from mole_serve.library.store import AdapterStore

if TYPE_CHECKING:  # the HTTP layer imports no torch: these load with the engine
    from mole_serve.compose import Components
    from mole_serve.engine.async_engine import AsyncEngine
    from mole_serve.engine.engine import LLMEngine
    from mole_serve.library.catalog import Catalog

log = logging.getLogger(__name__)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if loc[:1] == ["messages"] and len(loc) > 2 and loc[2] in MESSAGE_ROLES:
        del loc[2]  # the union's tag (the role), which names no field of the request
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    return (f"{param}: {message}" if param else message), param


def allowed_methods(app: FastAPI, path: str) -> set[str]:
    """Every method the schema documents at this path (Starlette's 405 names one route's only)."""
    for template, operations in truthful_openapi(app)["paths"].items():
        if re.fullmatch(re.sub(r"\{[^/]+\}", "[^/]+", template), path):
            return {method.upper() for method in operations}
    return set()


def attach_engine(app: FastAPI, engine: LLMEngine, catalog: Catalog) -> AsyncEngine:
    """Serve a built engine and the library it serves from (compose.build); the caller runs the
    engine's step loop (start or run_forever)."""
    from mole_serve.engine.async_engine import AsyncEngine

    metrics: Metrics = app.state.metrics
    if catalog.store.root.resolve() != app.state.store.root.resolve():
        raise ValueError(
            f"the catalog holds {catalog.store.root}, the app serves "
            f"{app.state.store.root}: give both the same adapters_dir"
        )
    aeng = AsyncEngine(engine, on_step=metrics.observe_step)
    app.state.catalog = catalog
    app.state.engine = aeng
    log.info("ready: %s with %d adapters", engine.model_name, len(catalog.names))
    return aeng


def create_app(settings: Settings, load_engine: Callable[[], Components] | None = None) -> FastAPI:
    """With load_engine (compose.build), the app builds in a thread at start-up and steps it in another;
    without, the caller attaches one (`mole-serve serve` steps it on the main thread). Requests get
    503 until an engine is attached."""
    metrics = Metrics(settings.metrics_adapter_limit)
    loop_ready = threading.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.loop = asyncio.get_running_loop()
        loop_ready.set()

        async def load(build: Callable[[], Components]) -> None:
            try:
                built = await asyncio.to_thread(build)
            except Exception:
                log.exception("the engine failed to load")
                raise
            attach_engine(app, built.engine, built.catalog).start()

        loading = asyncio.create_task(load(load_engine)) if load_engine else None
        yield
        if loading:
            loading.cancel()
            if app.state.engine is not None:
                app.state.engine.shutdown()

    app = FastAPI(title="mole-serve", lifespan=lifespan)
    app.state.engine = None
    app.state.catalog = None  # the adapter library, attached with the engine
    app.state.loop_ready = loop_ready
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.store = AdapterStore(settings.adapters_dir)
    app.state.engine_collector = metrics.watch_engine(lambda: app.state.engine)  # (a Ray ingress drops it)
    metrics.watch_library(lambda: app.state.catalog)  # adapters the store holds that failed to load

    def authorize(path: str, authorization: str | None) -> APIError | None:
        if path.startswith("/admin"):
            return admin_denial(settings, authorization)
        if path in LORA_ROUTES:
            return lora_denial(settings, authorization)
        keyed = path.startswith("/v1/") or path in TOKENIZER_ROUTES
        return api_key_denial(settings.api_key, authorization) if keyed else None

    app.add_middleware(  # outermost of ours: credentials, the body's limits, unexpected errors, the count
        RequestGate,
        authorize=authorize,
        count=lambda route, status: metrics.requests.labels(route, str(status)).inc(),
        body_limit=int(settings.max_request_mb * (1 << 20)),
        body_timeout_s=settings.body_timeout_s,
    )

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(MoleError)
    async def error_kind(request: Request, exc: MoleError):
        return await api_error(request, APIError.of(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        headers = exc.headers
        allowed = allowed_methods(app, request.url.path) if exc.status_code == 405 else None
        if allowed:
            headers = {**(headers or {}), "Allow": ", ".join(sorted(allowed))}
        return JSONResponse(
            APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code, headers=headers
        )

    @app.get("/health")
    async def health():
        if app.state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(openai_router)
    app.include_router(responses_router)
    app.include_router(admin_router)
    app.include_router(lora_router)
    app.include_router(tokenizer_router)
    app.openapi = lambda: truthful_openapi(app)  # type: ignore[method-assign]  # FastAPI's documented override
    return app
