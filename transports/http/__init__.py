"""The HTTP transport: hypercorn's trio worker (HTTP/1.1 and h2), JSON for unary calls, SSE or NDJSON
for streams. See docs/http.md."""

from ._server import HttpTransport as HttpTransport

__all__ = ["HttpTransport"]
