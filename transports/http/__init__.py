"""The HTTP transport: hypercorn's protocol layer (HTTP/1.1 and h2) in the runtime's own connection
loop, JSON for unary calls, SSE or NDJSON for streams. See docs/http.md.

Names are imported on first use (PEP 562), so loading the command-line plug-in (``_plugin``) does not
import the server or the client (httpx)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from ._client import http_stream as http_stream
    from ._client import parse_base_url as parse_base_url
    from ._server import HttpTransport as HttpTransport

_WHERE = {"HttpTransport": "._server", "http_stream": "._client", "parse_base_url": "._client"}
__all__ = ["HttpTransport", "http_stream", "parse_base_url"]


__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
