"""The trio-ingress TCP transport: the sans-IO protocol (``_protocol``, the codec), the server
(``TcpTransport``), the client (``TcpClient``) and the pooled client over many workers (``TcpPool``).
See docs/protocol-tcp.md.

Names are imported on first use (PEP 562), so loading the command-line plug-in (``_plugin``) does not
import the server or the client."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from ._client import ClientExchange as ClientExchange
    from ._client import ClientStream as ClientStream
    from ._client import TcpClient as TcpClient
    from ._pool import TcpPool as TcpPool
    from ._server import TcpTransport as TcpTransport

_WHERE = {
    "ClientExchange": "._client",
    "ClientStream": "._client",
    "TcpClient": "._client",
    "TcpPool": "._pool",
    "TcpTransport": "._server",
}
__all__ = ["ClientExchange", "ClientStream", "TcpClient", "TcpPool", "TcpTransport"]


__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
