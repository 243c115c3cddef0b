"""Hostile payloads and headers over every real transport: an answer for that request, nothing else hurt."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio

from runtime import ErrorCode, RequestContext, Worker, WorkerHandle, decode_error, open_worker
from runtime.testing import nats_server
from transports.http import HttpTransport
from transports.nats import NatsClient, NatsTransport
from transports.nats import _aio as aio
from transports.nats import _protocol as nats_protocol
from transports.tcp import TcpTransport
from transports.tcp import _protocol as codec

DEEP = b"[" * 100_000


def _worker() -> Worker:
    worker = Worker("hostile")

    @worker.endpoint("tokens")
    async def tokens(request, ctx: RequestContext):
        for i in range(request.get("n", 3)):
            await trio.sleep(request.get("gap", 0))
            yield i

    @worker.endpoint("echo")
    async def echo(request, ctx: RequestContext):
        return request

    @worker.endpoint("nan")
    async def nan(request, ctx: RequestContext):
        return {"logprob": math.nan}

    return worker


@asynccontextmanager
async def _serving(*transports) -> AsyncIterator[WorkerHandle]:
    async with open_worker(_worker(), list(transports)) as handle:
        yield handle


async def _tcp_events_until_done(stream: trio.SocketStream, conn: codec.Connection, streams: int) -> list:
    """Read frames until ``streams`` streams have each ended (END or ERROR)."""
    events: list = []
    while sum(isinstance(e, codec.End | codec.Error) for e in events) < streams:
        event = conn.next_event()
        if event is codec.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        else:
            events.append(event)
    return events


async def test_tcp_deep_nesting_fails_its_stream_and_leaves_its_sibling_streaming():
    """100,000 '[' on one stream is BAD_REQUEST for it; a sibling on the same connection completes."""
    async with (
        _serving(TcpTransport(port=0)) as handle,
        await trio.open_tcp_stream(*handle.addresses["tcp"]) as stream,
    ):
        conn = codec.Connection(codec.Role.CLIENT, max_frame_size=1 << 20)
        await stream.send_all(conn.send(conn.local_hello))
        while conn.peer_hello is None:
            conn.receive_data(await stream.receive_some(65536))
            conn.next_event()
        frames = [
            codec.Request(1, "tokens", "good", 0, (), b'{"n": 20, "gap": 0.005}'),
            codec.Request(3, "echo", "deep", 0, (), DEEP),
            codec.Request(5, "nan", "nan", 0, (), b"{}"),
        ]
        await stream.send_all(b"".join(conn.send(frame) for frame in frames))
        with trio.fail_after(10):
            events = await _tcp_events_until_done(stream, conn, 3)
    errors = {e.stream_id: e for e in events if isinstance(e, codec.Error)}
    assert errors[3].code == ErrorCode.BAD_REQUEST and "nested too deeply" in errors[3].message
    assert errors[5].code == ErrorCode.INTERNAL and "not JSON" in errors[5].message
    assert [json.loads(e.payload) for e in events if isinstance(e, codec.Data) and e.stream_id == 1] == list(
        range(20)
    )
    assert any(isinstance(e, codec.End) and e.stream_id == 1 for e in events)


@pytest.mark.parametrize(
    ("body", "headers", "names"),
    [
        (DEEP, {}, "nested too deeply"),
        (b"{}", {"x-request-timeout-ms": "²".encode("latin-1")}, "x-request-timeout-ms"),
        (b"{}", {"x-request-timeout-ms": "9" * 5000}, "x-request-timeout-ms"),
        (b"[NaN]", {}, "NaN"),
    ],
    ids=["deep-nesting", "superscript-two", "5000-digits", "nan-in"],
)
async def test_http_hostile_input_is_a_400_with_the_json_error_and_a_request_id(body, headers, names):
    """Deep nesting, odd timeout digits or NaN get a 400 with the JSON error body and x-request-id."""
    async with _serving(HttpTransport(port=0)) as handle:
        host, port = handle.addresses["http"]
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
            response = await client.post("/v1/echo", content=body, headers=headers)
            after = await client.post("/v1/echo", json={"still": "here"})
    error = response.json()["error"]
    assert response.status_code == 400 and response.headers["x-request-id"]
    assert error["code"] == "BAD_REQUEST" and names in error["message"] and error["retryable"] is False
    assert after.json() == {"still": "here"}


async def test_http_handler_returning_nan_is_a_500_with_valid_json():
    """A NaN from the handler becomes a 500 INTERNAL whose body is valid JSON, not 'NaN' on the wire."""
    async with _serving(HttpTransport(port=0)) as handle:
        host, port = handle.addresses["http"]
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
            response = await client.post("/v1/nan", json={})
    assert response.status_code == 500
    assert json.loads(response.content, parse_constant=pytest.fail)["error"]["code"] == "INTERNAL"


@pytest.mark.parametrize(
    ("body", "headers", "names"),
    [
        (DEEP, {}, "nested too deeply"),
        (b"{}", {nats_protocol.TIMEOUT_MS: "²"}, nats_protocol.TIMEOUT_MS),
        (b"{}", {nats_protocol.TIMEOUT_MS: "9" * 5000}, nats_protocol.TIMEOUT_MS),
        (b"{}", {nats_protocol.DEADLINE: "nan"}, "Unix seconds"),
    ],
    ids=["deep-nesting", "superscript-two", "5000-digits", "nan-deadline"],
)
async def test_nats_hostile_input_is_a_bad_request_reply_and_the_worker_serves_on(body, headers, names):
    """Inputs that used to kill the worker get a BAD_REQUEST reply; the next request is served."""
    async with (
        nats_server() as url,
        _serving(NatsTransport(url)),
        NatsClient.connect(url) as client,
    ):
        send, receive = trio.open_memory_channel(4)
        inbox, subscription = await aio.subscribe_inbox(client._client, send)
        for _ in range(2):  # twice: the first one did not take anything down
            await aio.publish_batch(
                client._client, [aio.Outgoing("ingress.echo", body, headers, reply=inbox)]
            )
            with trio.fail_after(10):
                reply = await receive.receive()
            assert reply.headers[nats_protocol.KIND] == nats_protocol.ERROR
            error = decode_error(reply.data)
            assert error.code is ErrorCode.BAD_REQUEST and names in error.message
        await aio.unsubscribe(subscription)
        assert await client.call("echo", {"still": "here"}) == {"still": "here"}
