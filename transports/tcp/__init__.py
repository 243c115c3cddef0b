"""The trio-ingress TCP transport: the sans-IO protocol (``_protocol``, the codec), the server
(``TcpTransport``) and the client (``TcpClient``). See docs/protocol-tcp.md.

Names are imported on first use (PEP 562), so loading the command-line plug-in (``_plugin``) does not
import the server or the client."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._client import ClientStream as ClientStream
    from ._client import TcpClient as TcpClient
    from ._server import TcpTransport as TcpTransport

_WHERE = {"ClientStream": "._client", "TcpClient": "._client", "TcpTransport": "._server"}
__all__ = ["ClientStream", "TcpClient", "TcpTransport"]


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
