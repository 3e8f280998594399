"""The one table from error kinds (mole_serve/errors.py) to HTTP status and OpenAI error type, and the
error as OpenAI shapes it: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from mole_serve.errors import (
    AlreadyExists,
    EngineFailure,
    InsufficientStorage,
    InvalidAdapter,
    InvalidRequest,
    MoleError,
    NotFound,
    Overloaded,
    ReplicaLost,
    TooLarge,
)

# kind -> (status, OpenAI error type); a kind's status is that of its first class found here in its MRO
STATUS: dict[type[MoleError], tuple[int, str]] = {
    InvalidRequest: (400, "invalid_request_error"),
    NotFound: (404, "invalid_request_error"),  # as OpenAI: the code says what was not found
    AlreadyExists: (409, "invalid_request_error"),
    TooLarge: (413, "invalid_request_error"),
    InvalidAdapter: (422, "invalid_request_error"),
    Overloaded: (429, "rate_limit_error"),
    ReplicaLost: (503, "server_error"),  # after its resends: the deployment is short of replicas
    InsufficientStorage: (507, "server_error"),  # the disk is full: the request was fine, nothing was stored
    EngineFailure: (500, "server_error"),
}
RETRY_AFTER_S = "1"  # what an Overloaded answer tells the client to wait


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def of(cls, error: MoleError) -> APIError:
        status, type_ = next((STATUS[k] for k in type(error).__mro__ if k in STATUS), (500, "server_error"))
        headers = {"Retry-After": RETRY_AFTER_S} if status == 429 else None
        return cls(status, error.message, type_, error.param, error.code, headers)
