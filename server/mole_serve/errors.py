"""The error kinds every layer raises for a caller's mistake or a refusal, without HTTP numbers.

api/errors.py holds the one table from these kinds to an HTTP status and OpenAI error type; a
Ray replica or the Python API can catch them the same way. Anything else that escapes is a bug
(a 500 in the log), never a 4xx by accident: a stray KeyError is not "not found".
"""

from __future__ import annotations


class MoleError(Exception):
    """Base of the kinds. `code` is the OpenAI-style machine-readable code; `param` the request
    field at fault, when one is."""

    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def __reduce__(self):  # picklable with its fields (a Ray replica sends errors to the ingress)
        return type(self), (self.message, self.param, self.code)


class InvalidRequest(MoleError, ValueError):
    """The request cannot be served as given (a bad field, over a limit)."""


class NotFound(MoleError):
    """A named thing does not exist."""

    code = "not_found"


class AdapterNotFound(NotFound):
    code = "adapter_not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class AlreadyExists(MoleError):
    code = "already_exists"


class TooLarge(MoleError):
    code = "too_large"


class InvalidAdapter(MoleError, ValueError):
    """Adapter files that are well-formed but do not fit this server (shapes, rank, format)."""

    code = "invalid_adapter"


class Overloaded(MoleError):
    """Too much work queued; the caller may retry shortly."""


class InsufficientStorage(MoleError):
    """The server's disk has no room for what the request would store (an upload, a card); nothing
    was changed, and the request may succeed once space is freed."""

    code = "insufficient_storage"


class EngineFailure(MoleError):
    """The engine could not finish a request (a failed step, a failed retrieval)."""


class ReplicaLost(EngineFailure):
    """The engine replica running a request died after its first output. A caller that has sent
    nothing of the answer yet (a non-streamed response) runs the request again; a stream cannot."""
