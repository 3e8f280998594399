"""/openapi.json as the server answers: FastAPI documents a body's validation failure as a 422 of
its own shape, while this server answers 400 in OpenAI's error shape (api/errors.py); each route
family lists the statuses it can answer, all in that shape; the OpenAI routes' answers have their
models (and SSE when streamed); /metrics is Prometheus text."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from mole_serve.api.protocol import CompletionEnvelope, ErrorResponse, ModelCard, ModelList
from mole_serve.api.responses_protocol import ResponseObject, ResponseStreamEvent

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
# route -> the model of its 200 answer (the routes return plain JSON, so FastAPI cannot see it)
ANSWERS: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": CompletionEnvelope,
    "/v1/completions": CompletionEnvelope,
    "/v1/models": ModelList,
    "/v1/models/{model_id}": ModelCard,
    "/v1/responses": ResponseObject,
}
STREAMED = ("/v1/chat/completions", "/v1/completions")
# a route whose stream is typed events (`event:` names each; no [DONE]) -> the model of one's `data`
EVENTS: dict[str, type[BaseModel]] = {"/v1/responses": ResponseStreamEvent}
# vLLM's runtime LoRA routes (api/vllm_routes.py)
LORA_ERRORS = {
    400: "Invalid field, a folder that is no adapter, or the name is taken (set load_inplace)",
    401: "Missing or wrong admin token (the API key when MOLE_ADMIN_TOKEN is unset)",
    403: "Loading by path disabled (MOLE_LORA_LOAD_ROOTS unset), or lora_path outside it",
    404: "No folder at lora_path, or no adapter lora_name to unload",
    408: "Request body not whole within MOLE_BODY_TIMEOUT_S",
    413: "Request body over MOLE_MAX_REQUEST_MB, or the adapter's files over MOLE_MAX_UPLOAD_BYTES",
    422: "The adapter's files do not fit the base model",
    429: "MOLE_MAX_CONCURRENT_UPLOADS loads and uploads in progress; retry after Retry-After",
    431: "Request headers over 64 KiB",
    503: "The model is still loading",
    507: "The adapter store's disk is full",
}
# vLLM's tokenizer routes
TOKENIZER_ERRORS = {
    400: "Invalid field, or a token id outside the vocabulary",
    401: "Missing or wrong API key (when MOLE_API_KEY is set)",
    404: "Unknown model",
    408: "Request body paused longer than MOLE_BODY_TIMEOUT_S",
    411: "No Content-Length",
    413: "Request body over MOLE_MAX_REQUEST_MB",
    431: "Request headers over 64 KiB",
    503: "The model is still loading",
}
# path prefix -> the error statuses its routes answer (beyond the success); the first that matches
ROUTE_ERRORS = {
    "/v1/load_lora_adapter": LORA_ERRORS,
    "/v1/unload_lora_adapter": LORA_ERRORS,
    "/tokenize": TOKENIZER_ERRORS,
    "/detokenize": TOKENIZER_ERRORS,
    "/v1/": {
        400: "Invalid request: a field, the context length, an adapter set",
        401: "Missing or wrong API key (when MOLE_API_KEY is set)",
        404: "Unknown model or adapter",
        408: "Request body not whole within MOLE_BODY_TIMEOUT_S",
        413: "Request body over MOLE_MAX_REQUEST_MB",
        431: "Request headers over 64 KiB",
        429: "Queue full; retry after Retry-After",
        503: "The model is still loading",
    },
    "/admin/": {
        400: "Invalid upload or field",
        401: "Missing or wrong admin token",
        403: "Admin API disabled (MOLE_ADMIN_TOKEN unset)",
        404: "Unknown adapter",
        408: "Request body paused longer than MOLE_BODY_TIMEOUT_S",
        409: "The adapter exists (use replace=true)",
        413: "Upload over the size limits",
        431: "Request headers over 64 KiB",
        422: "The adapter's files do not fit the base model",
        503: "The model is still loading",
    },
}


def truthful_openapi(app: FastAPI) -> dict:
    """The app's schema, generated once, with the error responses and media types it really sends."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    models: set[type[BaseModel]] = {ErrorResponse, *ANSWERS.values(), *EVENTS.values()}
    for model in models:
        components[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(components[model.__name__].pop("$defs", {}))
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, operations in schema["paths"].items():
        errors = next((e for prefix, e in ROUTE_ERRORS.items() if path.startswith(prefix)), {})
        for operation in operations.values():
            responses = operation["responses"]
            responses.pop("422", None)  # FastAPI's; validation failures are 400s in the error shape
            for status, description in errors.items():
                responses[str(status)] = {
                    "description": description,
                    "content": {"application/json": {"schema": ERROR_REF}},
                }
    for path, model in ANSWERS.items():
        content: dict[str, dict] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
        if path in STREAMED:  # with `stream: true`: server-sent events (the schema is one event's, as
            # OpenAPI before 3.2 has it): each `data:` an envelope in JSON, the last one [DONE]
            content["text/event-stream"] = {
                "schema": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {
                        "data": {
                            "anyOf": [
                                {"const": "[DONE]"},
                                {
                                    "type": "string",
                                    "contentMediaType": "application/json",
                                    "contentSchema": content["application/json"]["schema"],
                                },
                            ]
                        }
                    },
                }
            }
        if path in EVENTS:
            event = {"$ref": f"#/components/schemas/{EVENTS[path].__name__}"}
            content["text/event-stream"] = {
                "schema": {
                    "type": "object",
                    "required": ["event", "data"],
                    "properties": {
                        "event": {"type": "string"},
                        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": event},
                    },
                }
            }
        for operation in schema["paths"][path].values():
            operation["responses"]["200"]["content"] = content
    schema["paths"]["/metrics"]["get"]["responses"]["200"] = {
        "description": "Prometheus text exposition format",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
    schema["paths"]["/health"]["get"]["responses"]["503"] = {"description": "The model is still loading"}
    app.openapi_schema = schema
    return schema
