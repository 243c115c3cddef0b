"""The NATS transport (first slice, issue 4): queue-group subscriptions per endpoint, streamed replies with
sequence numbers, NatsClient. nats-py runs through trio-asyncio; all asyncio code is in ``_aio``."""

from ._client import NatsClient as NatsClient
from ._client import RetryBudget as RetryBudget
from ._server import NatsTransport as NatsTransport

__all__ = ["NatsClient", "NatsTransport", "RetryBudget"]
