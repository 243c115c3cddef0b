"""The exchange contract (duplex endpoints) on every transport that carries exchanges: the caller's
messages in, each answered in order, the half-close, a bad message, a handler that finishes first, and
the same accounting everywhere. NATS carries an exchange's input only as one NDJSON request so far
(docs/exchanges.md), so it is not in this list yet."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from runtime import RequestContext, Worker, open_worker
from runtime.mocker import create_mocker
from runtime.testing import MemoryTransport, sample
from transports.http import HttpTransport
from transports.tcp import TcpClient, TcpTransport

TRANSPORTS = ["memory", "tcp", "http1", "h2"]
TEST_TIMEOUT = 20

# What one exchange came back with: the answers, and the error code if it ended with one.
Outcome = tuple[list[Any], str | None]
Exchanger = Callable[[str, list[bytes]], Any]


def _worker() -> Worker:
    worker = create_mocker()  # chat: each message {"max_tokens": n} answered by n chunks of its turn

    @worker.endpoint("first_only", duplex=True)
    async def first_only(messages: AsyncIterator[Any], ctx: RequestContext) -> AsyncIterator[Any]:
        async for message in messages:
            yield message
            return  # done while the caller may still be sending

    return worker


@asynccontextmanager
async def exchanger(kind: str) -> AsyncIterator[tuple[Any, Exchanger]]:
    """A worker on ``kind`` and a function that runs one exchange: every message (raw JSON bytes), then
    the half-close, then every answer."""
    if kind == "memory":
        memory = MemoryTransport()
        async with open_worker(_worker(), [memory]) as handle:

            async def run_memory(endpoint: str, messages: list[bytes]) -> Outcome:
                call = memory.open(endpoint, b"")
                for message in messages:
                    await call.send_raw(message)
                call.end()
                await call.wait_done()
                error = call.sink.error
                return call.sink.chunks, error.code.name if error else None

            yield handle, run_memory
    elif kind == "tcp":
        async with (
            open_worker(_worker(), [TcpTransport(port=0)]) as handle,
            TcpClient.connect(*handle.addresses["tcp"]) as client,
        ):

            async def run_tcp(endpoint: str, messages: list[bytes]) -> Outcome:
                answers: list[Any] = []
                try:
                    async with client.exchange(endpoint, deadline=math.inf) as exchange:
                        for message in messages:
                            await exchange.send_raw(message)
                        await exchange.end()
                        async for chunk in exchange:
                            answers.append(chunk)
                except Exception as error:
                    return answers, getattr(getattr(error, "code", None), "name", type(error).__name__)
                return answers, None

            yield handle, run_tcp
    else:
        async with open_worker(_worker(), [HttpTransport(port=0)]) as handle:
            host, port = handle.addresses["http"]
            async with httpx.AsyncClient(
                base_url=f"http://{host}:{port}", http1=kind == "http1", http2=kind == "h2"
            ) as client:

                async def run_http(endpoint: str, messages: list[bytes]) -> Outcome:
                    body = b"".join(message + b"\n" for message in messages)
                    headers = {"accept": "application/x-ndjson"}
                    response = await client.post(f"/v1/{endpoint}", content=body, headers=headers)
                    lines = [json.loads(line) for line in response.text.splitlines() if line.strip()]
                    if lines and set(lines[-1]) == {"error"}:
                        return lines[:-1], lines[-1]["error"]["code"]
                    if response.status_code != 200:
                        return [], response.json()["error"]["code"]
                    return lines, None

                yield handle, run_http


@pytest.fixture(params=TRANSPORTS)
async def exchange(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Any, Exchanger, str]]:
    async with exchanger(request.param) as (handle, run):
        yield handle, run, request.param


async def test_every_message_is_answered_in_order_and_the_half_close_ends_it(exchange):
    """Two messages: two turns of answers, in order, then a clean end."""
    handle, run, kind = exchange
    with trio.fail_after(TEST_TIMEOUT):
        answers, error = await run("chat", [b'{"max_tokens": 2}', b'{"max_tokens": 1}'])
    assert error is None and [(a["turn"], a["index"]) for a in answers] == [(0, 0), (0, 1), (1, 0)]
    # The caller may hold the last byte before the worker has counted the exchange (HTTP): once it is
    # out of flight, it is counted (release and record run back to back, with no checkpoint between).
    await handle.binding(_name(kind), "chat").tracker.wait_idle()
    labels = {"endpoint": "chat", "transport": _name(kind)}
    counted = {
        direction: sample(handle.runtime, "ingress_exchange_messages_total", direction=direction, **labels)
        for direction in ("received", "sent")
    }
    assert counted == {"received": 2, "sent": 3}


async def test_a_message_that_is_not_json_ends_the_exchange_with_bad_request(exchange):
    """After the answers to what came before, BAD_REQUEST; never a cut or a crash."""
    _, run, _ = exchange
    with trio.fail_after(TEST_TIMEOUT):
        answers, error = await run("chat", [b'{"max_tokens": 1}', b"{not json"])
    assert error == "BAD_REQUEST" and [(a["turn"], a["index"]) for a in answers] == [(0, 0)]


async def test_a_handler_that_finishes_first_ends_the_exchange_cleanly(exchange):
    """The handler answers the first message and returns; the rest of the input is discarded."""
    _, run, _ = exchange
    with trio.fail_after(TEST_TIMEOUT):
        answers, error = await run("first_only", [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}'])
    assert error is None and answers == [{"n": 1}]


def _name(kind: str) -> str:
    return {"memory": "memory", "tcp": "tcp"}.get(kind, "http")
