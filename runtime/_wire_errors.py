"""The one wire-error codec, shared by every server and client.

An error on the wire is a code (the ``ErrorCode`` name in JSON bodies, its integer on TCP), a message
and whether a retry is safe. Servers encode with ``error_body``/``encode_error``; clients decode with
``remote_error``/``decode_error``, which never fail on what a newer worker might send: a code this
version does not know becomes a generic INTERNAL error that keeps the worker's ``retryable`` and names
the code it got (docs/protocol-tcp.md, "Version history").
"""

from __future__ import annotations

import json
from typing import Any

from ._errors import ERROR_CLASSES, ErrorCode, IngressError, RemoteError

_REMOTE_CLASSES: dict[ErrorCode, type[RemoteError]] = {
    code: type(f"Remote{cls.__name__}", (RemoteError, cls), {"__module__": __name__})
    for code, cls in ERROR_CLASSES.items()
}


def error_body(error: IngressError, retryable: bool) -> dict[str, Any]:
    """The JSON form of an error: ``{"code": "OVERLOADED", "message": ..., "retryable": true}``."""
    return {"code": error.code.name, "message": error.message, "retryable": retryable}


def encode_error(error: IngressError, retryable: bool) -> bytes:
    """``error_body`` as compact JSON bytes."""
    return json.dumps(error_body(error, retryable), separators=(",", ":")).encode()


def remote_error(code: int | str, message: str, *, retryable: bool) -> RemoteError:
    """The client-side error for a code as it came off the wire (an integer on TCP, a name in JSON):
    a ``RemoteError`` that is also the code's own class (``RemoteOverloaded`` is an ``Overloaded``)."""
    known = _known_code(code)
    if known is None:
        known, message = ErrorCode.INTERNAL, f"unknown error code {code!r}: {message}"
    return _REMOTE_CLASSES[known](known, message, retryable=retryable)


def decode_error(data: bytes | bytearray | dict[str, Any], *, context: str = "error reply") -> RemoteError:
    """The ``RemoteError`` for a JSON error body (bytes or already parsed). A body that is not one is
    reported as such (INTERNAL, not retryable) with its start, never as an exception of its own."""
    try:
        body = json.loads(data) if isinstance(data, bytes | bytearray) else data
        return remote_error(body["code"], str(body["message"]), retryable=bool(body["retryable"]))
    except (ValueError, KeyError, TypeError):
        shown = data[:200] if isinstance(data, bytes | bytearray) else data
        return remote_error(ErrorCode.INTERNAL, f"undecodable {context}: {shown!r}", retryable=False)


def _known_code(code: int | str) -> ErrorCode | None:
    if isinstance(code, bool):  # JSON true is not the code 1
        return None
    try:
        return ErrorCode[code] if isinstance(code, str) else ErrorCode(code)
    except (KeyError, ValueError):
        return None
