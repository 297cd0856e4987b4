"""Domain errors and the one table that maps them to HTTP and gRPC status codes.

Raise these anywhere (worker, scheduler, adapters); the doors translate them with `http_status`
and `grpc_status` and never invent codes of their own.
"""
from __future__ import annotations

import sys


# Messages quote client values (model names, datatypes, ids), and every door sends them back: a
# gRPC status message travels in a header, percent-encoded (a non-ASCII byte takes 3), and past the
# client's 8 KiB soft metadata limit the call may end RESOURCE_EXHAUSTED without our status or
# trailers: 1000 emoji were 11.8 KB. So the bound is on UTF-8 bytes (at most 3 KB on the wire); one
# bound here covers every door.
MAX_MESSAGE_BYTES = 1000


def bounded_message(message: str) -> str:
    if len(message) <= MAX_MESSAGE_BYTES and message.isascii():
        return message
    data = message[:MAX_MESSAGE_BYTES].encode("utf-8", "replace")  # "replace": lone surrogates
    if len(data) <= MAX_MESSAGE_BYTES and len(message) <= MAX_MESSAGE_BYTES:
        return data.decode("utf-8")
    kept = data[:MAX_MESSAGE_BYTES - 24].decode("utf-8", "ignore")  # "ignore": a character cut in two
    return f"{kept}... ({len(message)} chars)"


class DetserveError(Exception):
    """Base class. `code` is the stable machine-readable name sent to clients."""

    code = "internal"

    def __init__(self, message: str, *, retry_after_s: float | None = None):
        message = bounded_message(message)
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    def __reduce__(self):  # cross the process boundary with the message intact
        return (_rebuild, (type(self), self.message, self.retry_after_s))


def _rebuild(cls, message, retry_after_s):
    return cls(message, retry_after_s=retry_after_s)


class InvalidRequest(DetserveError):
    code = "invalid_request"


class InvalidImage(InvalidRequest):
    """Empty, corrupt or truncated image data."""

    code = "invalid_image"


class UnsupportedMediaType(InvalidRequest):
    code = "unsupported_media_type"


class PayloadTooLarge(DetserveError):
    code = "payload_too_large"


class ImageTooLarge(PayloadTooLarge):
    """Declared pixel count over the limit; refused before decoding."""

    code = "image_too_large"


class ModelNotFound(DetserveError):
    code = "model_not_found"


class Unauthenticated(DetserveError):
    code = "unauthenticated"


class PermissionDenied(DetserveError):
    code = "permission_denied"


class Overloaded(DetserveError):
    """The model's queue is full; retry after `retry_after_s`."""

    code = "overloaded"


class DeadlineExceeded(DetserveError):
    code = "deadline_exceeded"


class RequestTimeout(DetserveError):
    """The client did not send its request (headers or body) in time."""

    code = "request_timeout"


class ClientClosedRequest(DetserveError):
    """The client hung up before its request body arrived: nobody reads the answer, and it is not
    the server's fault (nginx's 499), so it must not be a 500 with a traceback per disconnect."""

    code = "client_closed_request"


class ModelNotReady(DetserveError):
    code = "model_not_ready"


class Conflict(DetserveError):
    """The request contradicts the current state: a model already loaded, or unregistered while
    it was being registered."""

    code = "conflict"


class WorkerDied(DetserveError):
    code = "worker_died"


class JobNotFound(DetserveError):
    code = "job_not_found"


class UpstreamUnavailable(DetserveError):
    """A service detserve calls (Label Studio) is down, overloaded or timing out: worth retrying."""

    code = "upstream_unavailable"


class UpstreamRefused(DetserveError):
    """A service detserve calls refused the request (4xx): retrying the same call will not help."""

    code = "upstream_refused"


class ConfigError(DetserveError):
    code = "config_error"


class InternalError(DetserveError):
    code = "internal"


# error class -> (HTTP status, gRPC status name). Most specific classes first: lookup walks the MRO.
ERROR_TABLE: dict[type[DetserveError], tuple[int, str]] = {
    InvalidImage: (400, "INVALID_ARGUMENT"),
    UnsupportedMediaType: (415, "INVALID_ARGUMENT"),
    InvalidRequest: (400, "INVALID_ARGUMENT"),
    ImageTooLarge: (413, "INVALID_ARGUMENT"),
    PayloadTooLarge: (413, "RESOURCE_EXHAUSTED"),
    ModelNotFound: (404, "NOT_FOUND"),
    Unauthenticated: (401, "UNAUTHENTICATED"),
    PermissionDenied: (403, "PERMISSION_DENIED"),
    Overloaded: (429, "RESOURCE_EXHAUSTED"),
    DeadlineExceeded: (504, "DEADLINE_EXCEEDED"),
    RequestTimeout: (408, "DEADLINE_EXCEEDED"),
    ClientClosedRequest: (499, "CANCELLED"),
    ModelNotReady: (503, "UNAVAILABLE"),
    Conflict: (409, "ALREADY_EXISTS"),
    WorkerDied: (503, "UNAVAILABLE"),
    JobNotFound: (404, "NOT_FOUND"),
    UpstreamUnavailable: (502, "UNAVAILABLE"),
    UpstreamRefused: (502, "FAILED_PRECONDITION"),
    ConfigError: (400, "INVALID_ARGUMENT"),
    InternalError: (500, "INTERNAL"),
}


def _lookup(err: BaseException) -> tuple[int, str]:
    for cls in type(err).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return (500, "INTERNAL")


def http_status(err: BaseException) -> int:
    return _lookup(err)[0]


def grpc_status(err: BaseException) -> str:
    """The name of a `grpc.StatusCode` member, so this module does not import grpc."""
    return _lookup(err)[1]


def is_cuda_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, asked without importing torch: the front process (and the
    inline pool in it) never loads torch for this."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)
