"""A worker whose handler logs the ways user and library code do (structlog, and stdlib ``logging`` as
nats-py does), for the process tests in test_logging.py: ``ingress serve logging_app:worker``."""

from __future__ import annotations

import logging

import structlog

from runtime import RequestContext, Worker

worker = Worker("logs")


@worker.endpoint("chatty")
async def chatty(request: dict, ctx: RequestContext) -> dict:
    structlog.get_logger().info("handler.said", value=request.get("value"))
    try:
        raise ConnectionResetError("peer reset")
    except ConnectionResetError:
        # The exact line nats-py logs from its read loop, through stdlib logging.
        logging.getLogger("nats.aio.client").exception("nats: encountered error")
    logging.getLogger("trio_asyncio").info("library info line")
    return {"ok": True}
