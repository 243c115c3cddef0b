"""The one boundary where request bytes become values and response values become bytes.

Every transport hands its raw request payload and its raw deadline headers to ``decode_payload`` and
``parse_deadline``; whatever goes wrong in there (invalid JSON, nesting deeper than the decoder can
follow, numbers too long to convert, NaN, digits that are not ASCII, ...) comes out as ``BadRequest``
for that one request, never as an exception that could reach a connection or the worker. Responses go
through ``encode_json``: a value that is not strict JSON (NaN, Infinity, sets, objects, cycles) is an
``InternalError`` for that one request, never invalid JSON on the wire.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from ._errors import BadRequest, InternalError

# The longest timeout a caller may ask for: ten digits of milliseconds (about 115 days). Longer ones
# are typos or attacks (Python refuses to convert more than 4,300 digits at all).
MAX_TIMEOUT_DIGITS = 10


def decode_payload(payload: bytes | bytearray | memoryview) -> Any:
    """A request payload as a value (``None`` when empty); any failure is ``BadRequest``."""
    if not payload:
        return None
    try:
        raw = bytes(payload) if isinstance(payload, memoryview) else payload
        # What json.loads does with bytes (UTF-8, -16 or -32, detected), with one decoder made once:
        # json.loads with options builds a new JSONDecoder on every call.
        return _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except RecursionError:
        raise BadRequest("request payload is nested too deeply to decode") from None
    except Exception as exc:  # any failure of this one payload is the caller's, never the worker's
        raise BadRequest(f"request payload is not valid JSON: {_short(exc)}") from None


def _refuse_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON (RFC 8259) does not, and nothing could echo them.
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 decodes to inf: as unencodable as Infinity itself
        raise ValueError(f"number {text[:20]} is out of range")
    return value


# Made once (json.dumps/json.loads with options build new ones on every call: a fifth of a token's cost).
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def _short(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def parse_deadline(
    accepted_at: float,
    timeout_ms: str | int | None = None,
    deadline_unix: str | None = None,
    *,
    timeout_name: str = "timeout",
) -> float:
    """The request's deadline in ``trio.current_time()`` terms (``inf`` without one): the earlier of a
    relative timeout counted from ``accepted_at`` and an absolute Unix-seconds deadline. A header that
    is present but malformed is ``BadRequest`` naming ``timeout_name``."""
    deadline = math.inf
    if timeout_ms is not None:
        deadline = accepted_at + _milliseconds(timeout_ms, timeout_name) / 1000
    if deadline_unix is not None:
        deadline = min(deadline, accepted_at + (_unix_seconds(deadline_unix) - time.time()))
    return deadline


def _milliseconds(value: str | int, name: str) -> int:
    if isinstance(value, int):  # a binary field (TCP): the codec bounds it already
        millis = value
    elif value.isascii() and value.isdigit() and len(value) <= MAX_TIMEOUT_DIGITS:
        millis = int(value)  # isascii: str.isdigit() alone accepts "²" and other digits int() refuses
    else:
        shown = value if len(value) <= 20 else value[:17] + "..."
        raise BadRequest(f"{name} must be a positive integer of milliseconds, got {shown!r}")
    if millis <= 0:
        raise BadRequest(f"{name} must be a positive integer of milliseconds, got {millis}")
    return millis


def _unix_seconds(value: str) -> float:
    try:
        seconds = float(value) if value.isascii() else math.nan  # float() reads any script's digits
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):
        shown = value if len(value) <= 20 else value[:17] + "..."
        raise BadRequest(f"the absolute deadline must be Unix seconds, got {shown!r}")
    return seconds


def encode_json(value: Any) -> bytes:
    """A response value as compact strict JSON; a value that cannot be is ``InternalError``."""
    try:
        return _ENCODER.encode(value).encode()
    except RecursionError:
        raise InternalError("the endpoint returned a value nested too deeply to encode as JSON") from None
    except Exception as exc:  # TypeError (not JSON), ValueError (NaN, Infinity, a cycle)
        raise InternalError(f"the endpoint returned a value that is not JSON: {_short(exc)}") from None
