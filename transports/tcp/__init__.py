"""The trio-ingress TCP transport: server (``TcpTransport``), client (``TcpClient``) and the sans-IO codec."""

from ._client import ClientStream as ClientStream
from ._client import TcpClient as TcpClient
from ._server import TcpTransport as TcpTransport

__all__ = ["ClientStream", "TcpClient", "TcpTransport"]
