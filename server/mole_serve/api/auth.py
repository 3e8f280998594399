"""The one reading of an `Authorization` header, for the API key (/v1, here) and the admin token
(/admin, admin_routes.admin_denial)."""

from __future__ import annotations

import secrets

from mole_serve.api.errors import APIError


def bearer_token(authorization: str | None) -> str | None:
    """The token of `Authorization: Bearer <token>`, else None: no header, another scheme, or a bare
    token without one. The scheme is case-insensitive (RFC 9110 section 11.1)."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def presents(authorization: str | None, secret: str) -> bool:
    """Whether the header carries `secret` as its bearer token (compared in constant time)."""
    token = bearer_token(authorization)
    # bytes: a header may hold any Latin-1 text, which compare_digest refuses as str
    return token is not None and secrets.compare_digest(token.encode(), secret.encode())


def api_key_denial(api_key: str | None, authorization: str | None) -> APIError | None:
    """None if a /v1 request may go on (no key configured, or the right one); else its 401."""
    if not api_key or presents(authorization, api_key):
        return None
    return APIError(
        401,
        "Incorrect or missing API key: send `Authorization: Bearer <MOLE_API_KEY>`.",
        "invalid_request_error",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )
