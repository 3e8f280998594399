"""Schemathesis hooks for tests/unit/test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS).

Its built-in `positive_data_acceptance` wants every schema-valid request answered 2xx. Some
refusals depend on more than one request's shape: a prompt too long for the context window, a
tool_choice naming a tool that is not in `tools`, a JSON schema the grammar compiler refuses, an
upload whose files are no adapter. This check replaces it: a schema-valid request may be refused
only for one of those reasons, each recognized by its documented param or code."""

import schemathesis

ALLOWED = (200, 201, 401, 403, 404, 409, 429)
# param (or code) -> why a schema-valid request can still be refused
SEMANTIC = {
    "context_length_exceeded": "the prompt and max_tokens exceed the context window",
    "tool_choice": "tool_choice names a tool that is absent, or asks for calls without `tools`",
    "tools": "tool names clash, or a tool's parameters are no schema the grammar can use",
    "response_format": "response_format combined with a forced tool call",
    "top_logprobs": "top_logprobs without logprobs: true",
    "composition": "composition `gate` on a server that has no trained gate",
    "adapters": "more adapters than the server's per-request limit, or a mixture of experts named with others",
    "prompt": "token ids beyond the model's vocabulary",
    "retrieval_top_k": "retrieval_top_k over the server's adapters-per-request limit (MOLE_MAX_ADAPTERS_PER_REQUEST)",
    "logit_bias": "a token id beyond the model's vocabulary",
    "stop_token_ids": "a token id beyond the model's vocabulary",
    "min_tokens": "min_tokens over max_tokens (or over what the context window leaves)",
    "response_format.json_schema.schema": "a JSON schema the grammar compiler refuses",
    "text.format.schema": "a JSON schema the grammar compiler refuses (/v1/responses)",
    "invalid_upload": "the uploaded files are no adapter (their bytes are beyond the schema)",
    "invalid_adapter": "the uploaded tensors do not fit the base model",
    "echo": "max_tokens 0 without echo: true (/v1/completions scores a prompt only when it echoes it)",
    "best_of": "best_of under n, or above n with stream: true",
    "tokens": "a token id beyond the model's vocabulary (/detokenize)",
    "continue_final_message": "continue_final_message with add_generation_prompt, or a last message it cannot continue",
}


@schemathesis.check
def positive_data_accepted_or_refused_for_a_documented_reason(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code in ALLOWED:
        return None
    if response.status_code == 413:  # a body over MOLE_MAX_REQUEST_MB / the upload limit
        return None
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        error = {}
    if response.status_code in (400, 422) and (error.get("param") in SEMANTIC or error.get("code") in SEMANTIC):
        return None
    raise AssertionError(
        f"a schema-valid request was refused without a documented reason: [{response.status_code}] "
        f"{response.text[:400]}"
    )
