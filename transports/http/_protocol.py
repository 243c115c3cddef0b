"""The HTTP transport's wire format, with no I/O (docs/http.md): routes, headers, status codes, the
SSE and NDJSON framing of streams and the JSON error document. The server and the client both use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from runtime import ErrorCode, IngressError, RemoteError, decode_error, error_body, remote_error

STATUS_FOR_CODE = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.OVERLOADED: 429,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.CANCELLED: 499,  # nginx's "client closed request"; a stream killed by its caller
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.PERMISSION_DENIED: 403,
}
# With every 401 (RFC 9110 11.6.1, RFC 6750 3): how to authenticate.
WWW_AUTHENTICATE = b'Bearer realm="trio-ingress"'
# Seconds a client should wait before retrying a 429 or 503 (on this worker or, better, another).
RETRY_AFTER = b"1"
TIMEOUT_HEADER = "x-request-timeout-ms"
REQUEST_ID_HEADER = "x-request-id"
NDJSON = "application/x-ndjson"
JSON = b"application/json"
EVENT_STREAM = b"text/event-stream"
# Refusals of a draining worker: on HTTP/1.1 they also close the connection (HTTP/2 forbids the header).
DRAINING_CODES = (ErrorCode.SHUTTING_DOWN, ErrorCode.UNAVAILABLE)
# The actions on a running request: POST /v1/{endpoint}/{request_id}/{action}.
SIGNALS = ("stop", "kill")


@dataclass(frozen=True, slots=True)
class Route:
    """What a ``/v1/`` path asks for: a call of ``endpoint``, or a ``signal`` to one of its requests."""

    endpoint: str
    request_id: str | None = None
    signal: str | None = None


def parse_route(path: str, raw_path: bytes | None = None) -> Route | None:
    """``/v1/{endpoint}`` or ``/v1/{endpoint}/{request_id}/stop|kill``; None for anything else. Split
    on the raw path when there is one, so that a request id with an escaped ``/`` (``%2F``) stays one
    segment; each segment is then percent-decoded."""
    if not path.startswith("/v1/"):
        return None
    if raw_path is not None:
        parts = [unquote(part.decode("latin-1")) for part in raw_path.split(b"/")[2:]]
    else:
        parts = path[len("/v1/") :].split("/")
    if len(parts) == 1:
        return Route(parts[0])
    if len(parts) == 3 and parts[0] and parts[1] and parts[2] in SIGNALS:
        return Route(parts[0], parts[1], parts[2])
    return None


def status_for(error: IngressError) -> int:
    """The status of an error: the transport's own (413, 408) where it chose one, else by code."""
    return getattr(error, "http_status", None) or STATUS_FOR_CODE[error.code]


def error_document(error: IngressError, retryable: bool) -> bytes:
    """``{"error": {"code", "message", "retryable"}}``: an error response's body and a stream's error."""
    return json.dumps({"error": error_body(error, retryable)}).encode()


def sse_data(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


def sse_end(chunks: int) -> bytes:
    return b'event: end\ndata: {"chunks":%d}\n\n' % chunks


def sse_error(document: bytes) -> bytes:
    return b"event: error\ndata: " + document + b"\n\n"


def ndjson_line(data: bytes) -> bytes:
    return data + b"\n"


def decode_error_document(body: bytes, status: int) -> RemoteError:
    """The ``RemoteError`` for an error response (or an NDJSON error line) of status ``status``."""
    try:
        document = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return remote_error(ErrorCode.INTERNAL, f"HTTP {status}: {body[:200]!r}", retryable=False)
    return decode_error(document, context=f"HTTP {status} error")


def ndjson_value(line: bytes) -> Any:
    """One NDJSON line of a stream: a chunk, or the ``RemoteError`` the stream ended with (raised)."""
    value = json.loads(line)
    if isinstance(value, dict) and set(value) == {"error"}:
        raise decode_error_document(line, 200)
    return value
