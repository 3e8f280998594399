"""A prompt's length in characters against the context window, checked before the tokenizer runs (a
token covers at most `max_token_chars` characters). The limits on requests and connections before
any route runs are api/gate.py's and the HTTP server's (api/http_server.py; docs/limits.md)."""

from __future__ import annotations

from mole_serve.api.errors import APIError


def check_prompt_chars(num_chars: int, max_token_chars: int, window: int) -> None:
    """Refuse a prompt that cannot fit the window whatever the tokenizer makes of it."""
    if num_chars > window * max_token_chars:
        raise APIError(
            400,
            f"This model's maximum context length is {window} tokens; the prompt's {num_chars} "
            f"characters are more than {window} tokens of at most {max_token_chars} characters.",
            param="messages",
            code="context_length_exceeded",
        )
