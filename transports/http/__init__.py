"""The HTTP transport: hypercorn's protocol layer (HTTP/1.1 and h2) in the runtime's own connection
loop, JSON for unary calls, SSE or NDJSON for streams. See docs/http.md.

Names are imported on first use (PEP 562), so loading the command-line plug-in (``_plugin``) does not
import the server or the client (httpx)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._client import http_stream as http_stream
    from ._client import parse_base_url as parse_base_url
    from ._server import HttpTransport as HttpTransport

_WHERE = {"HttpTransport": "._server", "http_stream": "._client", "parse_base_url": "._client"}
__all__ = ["HttpTransport", "http_stream", "parse_base_url"]


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
