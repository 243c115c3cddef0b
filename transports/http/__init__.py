"""The HTTP transport: hypercorn's trio worker (HTTP/1.1 and h2), JSON for unary calls, SSE or NDJSON
for streams. See docs/http.md."""

from ._client import http_stream as http_stream
from ._client import parse_base_url as parse_base_url
from ._server import HttpTransport as HttpTransport

__all__ = ["HttpTransport", "http_stream", "parse_base_url"]
