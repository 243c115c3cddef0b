"""The HTTP transport against a real hypercorn on 127.0.0.1, with httpx over HTTP/1.1 and h2."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager

import httpx
import pytest
import trio
import trio.testing

from runtime import RequestContext, Worker, WorkerConfig, open_worker
from runtime.testing import accepted_sockets, keepalive_settings, sample
from transports.http import HttpTransport


class Probe:
    def __init__(self) -> None:
        self.started = trio.Event()
        self.finished = trio.Event()
        self.cancelled = False
        self.running = 0
        self.two_running = trio.Event()

    def start(self) -> None:
        self.started.set()
        self.running += 1
        if self.running >= 2:
            self.two_running.set()


def _worker(probe: Probe) -> Worker:
    worker = Worker("http-test")

    @worker.endpoint("tokens")
    async def tokens(request, ctx: RequestContext):
        probe.start()
        try:
            for i in range(request.get("n", 3)):
                await trio.sleep(request.get("gap", 0))
                yield {"i": i}
        except trio.Cancelled:
            probe.cancelled = True
            raise
        finally:
            probe.finished.set()

    @worker.endpoint("echo")
    async def echo(request, ctx: RequestContext):
        return {
            "request": request,
            "id": ctx.id,
            "remaining": min(ctx.time_remaining(), 1e9),
        }  # JSON has no Infinity

    @worker.endpoint("slow", max_concurrency=1)
    async def slow(request, ctx):
        probe.started.set()
        await trio.sleep(request.get("sleep", 10))
        return "done"

    @worker.endpoint("broken")
    async def broken(request, ctx):
        raise RuntimeError("database password is hunter2")

    return worker


@asynccontextmanager
async def serving(
    probe: Probe, http2: bool = False, **options
) -> AsyncIterator[tuple[object, httpx.AsyncClient]]:
    async with open_worker(
        _worker(probe), [HttpTransport(port=0, **options)], WorkerConfig(drain_timeout=10)
    ) as handle:
        host, port = handle.addresses["http"]
        async with httpx.AsyncClient(
            base_url=f"http://{host}:{port}", http1=not http2, http2=http2
        ) as client:
            yield handle, client


@pytest.mark.parametrize("http2", [False, True])
async def test_unary_json_and_request_id(http2):
    """A unary call answers JSON; X-Request-Id is echoed; the timeout header becomes the deadline."""
    async with serving(Probe(), http2) as (_, client):
        response = await client.post(
            "/v1/echo", json={"a": 1}, headers={"x-request-id": "rid-7", "x-request-timeout-ms": "5000"}
        )
    assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    assert response.status_code == 200 and response.headers["x-request-id"] == "rid-7"
    body = response.json()
    assert body["request"] == {"a": 1} and body["id"] == "rid-7" and 4 < body["remaining"] <= 5


@pytest.mark.parametrize("http2", [False, True])
async def test_stream_as_sse_with_an_end_event(http2):
    """A streaming endpoint answers text/event-stream: one data line per chunk, then an explicit end event."""
    async with serving(Probe(), http2) as (_, client):
        response = await client.post("/v1/tokens", json={"n": 3})
    assert response.headers["content-type"] == "text/event-stream"
    assert response.text == (
        'data: {"i":0}\n\ndata: {"i":1}\n\ndata: {"i":2}\n\nevent: end\ndata: {"chunks":3}\n\n'
    )


async def test_stream_as_ndjson_when_asked():
    """Accept: application/x-ndjson gets one JSON document per line."""
    async with serving(Probe()) as (_, client):
        response = await client.post("/v1/tokens", json={"n": 2}, headers={"accept": "application/x-ndjson"})
    assert response.headers["content-type"] == "application/x-ndjson"
    assert [json.loads(line) for line in response.text.splitlines()] == [{"i": 0}, {"i": 1}]


async def test_status_mapping():
    """Each error class gets its natural status and a JSON body that says what to fix."""
    async with serving(Probe(), max_body_size=1024) as (_, client):
        cases = {
            "unknown endpoint": (await client.post("/v1/missing", json={}), 404, "NOT_FOUND"),
            "invalid JSON": (await client.post("/v1/echo", content=b"{oops"), 400, "BAD_REQUEST"),
            "bad timeout": (
                await client.post("/v1/echo", json={}, headers={"x-request-timeout-ms": "soon"}),
                400,
                "BAD_REQUEST",
            ),
            "too large": (
                await client.post("/v1/echo", content=b"[" + b"1," * 2000 + b"1]"),
                413,
                "BAD_REQUEST",
            ),
            "deadline": (
                await client.post("/v1/slow", json={"sleep": 5}, headers={"x-request-timeout-ms": "50"}),
                504,
                "DEADLINE_EXCEEDED",
            ),
            "internal": (await client.post("/v1/broken", json={}), 500, "INTERNAL"),
            "wrong method": (await client.get("/v1/echo"), 405, "BAD_REQUEST"),
        }
    for name, (response, status, code) in cases.items():
        assert response.status_code == status, name
        assert response.json()["error"]["code"] == code, name
    assert "hunter2" not in cases["internal"][0].text
    assert cases["wrong method"][0].headers["allow"] == "POST"


async def test_drain_answers_new_calls_503_finishes_streams_and_closes_idle_keep_alive_in_phase_3():
    """Phase 1: new calls get 503, running streams finish; idle keep-alive connections close in phase 3."""
    probe = Probe()
    async with serving(probe) as (handle, h1):
        host, port = handle.addresses["http"]
        async with (
            await trio.open_tcp_stream(host, port) as idle,
            httpx.AsyncClient(base_url=f"http://{host}:{port}", http1=False, http2=True) as h2,
            trio.open_nursery() as nursery,
        ):
            await idle.send_all(b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n")
            answer = b""
            while not answer.endswith(b"\r\n\r\nok\n"):
                answer += await idle.receive_some(4096)
            assert answer.startswith(b"HTTP/1.1 200")  # now an idle keep-alive connection
            results = {}

            async def stream(name: str, client: httpx.AsyncClient) -> None:
                results[name] = await client.post("/v1/tokens", json={"n": 20, "gap": 0.02})

            nursery.start_soon(stream, "h1", h1)
            nursery.start_soon(stream, "h2", h2)
            await probe.two_running.wait()  # both connections are busy when the drain starts
            handle.shutdown("test")
            await handle.wait_intake_closed()
            on_busy_h2 = await h2.post("/v1/echo", json={})
            async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as fresh:
                on_new_connection = await fresh.post("/v1/echo", json={})
                ready = await fresh.get("/ready")
            with trio.fail_after(5):
                assert await idle.receive_some(4096) == b""  # the worker closed it (phase 3)
        for refused in (on_busy_h2, on_new_connection):
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "UNAVAILABLE" and refused.json()["error"]["retryable"]
        assert on_new_connection.headers["connection"] == "close"
        assert ready.status_code == 503
        assert handle.binding("http", "echo").statistics().started == 0  # never reached a handler
        for name in ("h1", "h2"):
            assert results[name].text.endswith('event: end\ndata: {"chunks":20}\n\n'), name
        assert not (await handle.wait_drained()).forced


async def test_call_reaching_a_closed_endpoint_gets_503_retry_after_and_close():
    """A request hypercorn hands over after intake closed gets 503, Retry-After and Connection: close."""
    from runtime.testing import bind_for_test
    from transports.http._app import IngressApp

    bound = bind_for_test(_worker(Probe()))
    bound.transport.close_intake()
    app = IngressApp(bound.transport, max_body_size=1024, stream_high_water=1024)
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/echo", "headers": [], "client": ("127.0.0.1", 1)}
    await app(scope, receive, send)
    headers = dict(sent[0]["headers"])
    assert sent[0]["status"] == 503
    assert headers[b"retry-after"] == b"1" and headers[b"connection"] == b"close"
    assert json.loads(sent[1]["body"])["error"]["code"] == "UNAVAILABLE"


async def test_ready_is_503_during_shutdown_delay():
    """From the signal on, /ready answers 503 while the worker still serves (phase 0)."""
    async with open_worker(
        _worker(Probe()), [HttpTransport(port=0)], WorkerConfig(shutdown_delay=30, drain_timeout=60)
    ) as handle:
        host, port = handle.addresses["http"]
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
            assert (await client.get("/ready")).status_code == 200
            handle.shutdown("test")
            assert (await client.get("/ready")).status_code == 503
            assert (await client.post("/v1/echo", json={})).status_code == 200  # still serving
            handle.shutdown("skip the delay")


# Leaving an h2 response early makes httpcore drop its own async generators to the garbage collector,
# which Trio reports; the warning is about the client library, not the code under test.
_HTTPCORE_GENERATORS = r"(httpcore|httpx)\..*was garbage collected"


async def test_health_and_metrics_routes():
    """/health is 200, /metrics is Prometheus text with the request counters."""
    async with serving(Probe()) as (_, client):
        await client.post("/v1/echo", json={})
        health = await client.get("/health")
        metrics = await client.get("/metrics")
    assert health.status_code == 200
    assert 'ingress_requests_total{endpoint="echo",outcome="ok",transport="http"} 1.0' in metrics.text


class _RecordingProtocol:
    def __init__(self) -> None:
        self.events: list[object] = []

    async def handle(self, event: object) -> None:
        self.events.append(event)


async def test_a_sender_cancelled_mid_send_loses_nothing_and_keeps_the_connection():
    """Bytes handed to the loop go out even if their sender is cancelled; the connection lives on."""
    from hypercorn.config import Config
    from hypercorn.events import Closed, RawData

    from runtime._http_server import Connection, HttpServerLimits

    left, right = trio.socket.socketpair()
    with left, right:
        connection = Connection(None, Config(), HttpServerLimits(), trio.SocketStream(left))  # type: ignore[arg-type]
        connection.protocol = _RecordingProtocol()  # type: ignore[assignment]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection._write_loop)
            with trio.CancelScope() as killed:  # a request killed (its client reset the stream)
                killed.cancel()
                await connection.send(RawData(b"frames of other streams|"))
            await connection.send(RawData(b"next"))
            received = b""
            with trio.fail_after(5):
                while received != b"frames of other streams|next":
                    received += await right.recv(4096)
            nursery.cancel_scope.cancel()
    assert not [e for e in connection.protocol.events if isinstance(e, Closed)]


async def test_a_peer_that_resets_while_the_loop_writes_ends_only_its_connection():
    """A broken socket stops the writer and tells the protocol Closed once; later sends are dropped."""
    from hypercorn.config import Config
    from hypercorn.events import Closed, RawData

    from runtime._http_server import Connection, HttpServerLimits

    left, right = trio.socket.socketpair()
    with left:
        connection = Connection(None, Config(), HttpServerLimits(), trio.SocketStream(left))  # type: ignore[arg-type]
        connection.protocol = _RecordingProtocol()  # type: ignore[assignment]
        right.close()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection._write_loop)
            await connection.send(RawData(b"x" * 100_000))
            await trio.testing.wait_all_tasks_blocked()
            await connection.send(RawData(b"y"))  # nothing more is written once the stream failed
            nursery.cancel_scope.cancel()
    assert [type(e) for e in connection.protocol.events] == [Closed]


async def test_hypercorn_is_not_patched():
    """Serving HTTP leaves hypercorn's own classes alone: the connection loop is the project's."""
    from hypercorn.trio import run as hypercorn_run
    from hypercorn.trio import tcp_server

    async with serving(Probe()) as (_, client):
        assert (await client.get("/health")).status_code == 200
    assert hypercorn_run.TCPServer is tcp_server.TCPServer


@pytest.mark.filterwarnings(f"ignore:Async generator '{_HTTPCORE_GENERATORS}:ResourceWarning")
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <async_generator object:pytest.PytestUnraisableExceptionWarning"
)
async def test_h2_clients_closing_mid_stream_leave_the_server_and_other_streams_running():
    """h2 clients closing mid-stream stop neither the server nor a stream on another connection."""
    async with serving(Probe()) as (handle, client):
        host, port = handle.addresses["http"]
        base = f"http://{host}:{port}"
        async with trio.open_nursery() as nursery:
            survivor: dict[str, httpx.Response] = {}

            async def long_stream() -> None:
                survivor["response"] = await client.post("/v1/tokens", json={"n": 200, "gap": 0.005})

            nursery.start_soon(long_stream)
            for _ in range(20):
                async with (
                    httpx.AsyncClient(base_url=base, http1=False, http2=True) as h2,
                    trio.open_nursery() as inner,
                ):
                    for _ in range(4):
                        inner.start_soon(_read_one_chunk, h2)
                # Leaving the block closed the h2 connection with four streams still running.
        assert survivor["response"].text.endswith('event: end\ndata: {"chunks":200}\n\n')
        assert (await client.post("/v1/echo", json={})).status_code == 200
        await handle.binding("http", "tokens").tracker.wait_idle()
        labels = {"endpoint": "tokens", "transport": "http"}
        assert sample(handle.runtime, "ingress_requests_total", **labels, outcome="disconnected") == 80


async def _read_one_chunk(client: httpx.AsyncClient) -> None:
    request = client.build_request("POST", "/v1/tokens", json={"n": 100000, "gap": 0.001})
    response = await client.send(request, stream=True)
    chunks = response.aiter_raw()
    async with aclosing(chunks):  # type: ignore[type-var]
        await chunks.__anext__()


class _RawH2:
    """A minimal HTTP/2 client on the h2 library, for what httpx cannot do (reset one stream)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        import h2.config
        import h2.connection

        self.stream = stream
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.data: dict[int, bytearray] = {}
        self.ended: set[int] = set()

    async def flush(self) -> None:
        await self.stream.send_all(self.conn.data_to_send())

    async def post(self, path: str, body: bytes) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        headers = [(":method", "POST"), (":path", path), (":scheme", "http"), (":authority", "test")]
        self.conn.send_headers(stream_id, headers)
        self.conn.send_data(stream_id, body, end_stream=True)
        self.data[stream_id] = bytearray()
        await self.flush()
        return stream_id

    async def read_until(self, condition) -> None:
        import h2.events

        while not condition():
            for event in self.conn.receive_data(await self.stream.receive_some(65536)):
                if isinstance(event, h2.events.DataReceived):
                    self.data[event.stream_id] += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    self.ended.add(event.stream_id)
            await self.flush()


async def test_h2_rst_stream_cancels_only_that_stream():
    """RST_STREAM on one HTTP/2 stream cancels its handler; a sibling stream on the connection completes."""
    probe = Probe()
    async with serving(probe) as (handle, _):
        async with await trio.open_tcp_stream(*handle.addresses["http"]) as tcp:
            client = _RawH2(tcp)
            doomed = await client.post("/v1/tokens", json.dumps({"n": 100000, "gap": 0.005}).encode())
            sibling = await client.post("/v1/tokens", json.dumps({"n": 40, "gap": 0.005}).encode())
            await client.read_until(lambda: b"data:" in client.data[doomed])
            client.conn.reset_stream(doomed)
            await client.flush()
            await client.read_until(lambda: sibling in client.ended)
            # Still connected: only the RST can have ended the doomed handler.
            with trio.fail_after(5):
                await handle.binding("http", "tokens").tracker.wait_idle()
        assert client.data[sibling].endswith(b'event: end\ndata: {"chunks":40}\n\n')
        labels = {"endpoint": "tokens", "transport": "http"}
        assert sample(handle.runtime, "ingress_requests_total", **labels, outcome="disconnected") == 1
        assert sample(handle.runtime, "ingress_requests_total", **labels, outcome="ok") == 1


async def test_slowloris_head_is_closed_after_keep_alive_timeout():
    """A client that dribbles its request head is disconnected after keep_alive_timeout; others are served."""
    async with serving(Probe(), keep_alive_timeout=0.5) as (handle, client):
        host, port = handle.addresses["http"]
        async with await trio.open_tcp_stream(host, port) as slow:
            start = trio.current_time()
            closed = False
            with trio.fail_after(10):
                for byte in b"POST /v1/echo HTTP/1.1\r\nhost: t\r\nx-padding: " + b"a" * 1000:
                    try:
                        await slow.send_all(bytes([byte]))
                    except trio.BrokenResourceError:
                        closed = True
                        break
                    assert (await client.post("/v1/echo", json={})).status_code == 200
                    await trio.sleep(0.05)
            elapsed = trio.current_time() - start
        assert closed and 0.4 < elapsed < 5


async def test_a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_closes():
    """A complete head followed by a stalled body is answered 408 after body_timeout, then closed."""
    async with serving(Probe(), body_timeout=0.2) as (handle, client):
        async with await trio.open_tcp_stream(*handle.addresses["http"]) as slow:
            head = b"POST /v1/echo HTTP/1.1\r\nhost: t\r\ncontent-length: 100\r\n\r\n"
            await slow.send_all(head + b'{"x": ')  # ... and the other 94 bytes never come
            with trio.fail_after(10):
                response = b""
                while chunk := await slow.receive_some():  # until the server closes
                    response += chunk
        assert (await client.post("/v1/echo", json={"still": "served"})).status_code == 200
    status, _, rest = response.partition(b"\r\n")
    assert status == b"HTTP/1.1 408 "
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert "body_timeout" in error["message"] and error["retryable"] is True
    assert sample(handle.runtime, "ingress_inflight_requests") == 0


@pytest.mark.skipif(not hasattr(socket, "TCP_KEEPIDLE"), reason="keepalive timings are Linux options")
async def test_accepted_connections_probe_a_silent_client_with_tcp_keepalive():
    """The worker turns on kernel keepalive for every HTTP connection it accepts (off with None)."""
    for keepalive, expected in ((12, (1, 12, 4, 3)), (None, (0,))):
        async with serving(Probe(), keepalive=keepalive) as (handle, client):
            assert (await client.post("/v1/echo", json={})).status_code == 200  # a connection is open
            [served, *_] = accepted_sockets(handle.addresses["http"][1])
            assert keepalive_settings(served)[: len(expected)] == expected


@pytest.mark.parametrize(("http2", "version"), [(True, "HTTP/2"), (False, "HTTP/1.1")])
async def test_tls_negotiates_h2_or_http1_by_alpn(self_signed, http2, version):
    """With a certificate and key the port speaks TLS; ALPN picks h2 when the client offers it."""
    import ssl

    cert, key = self_signed
    transport = HttpTransport(port=0, certfile=cert, keyfile=key)
    async with open_worker(_worker(Probe()), [transport]) as handle:
        host, port = handle.addresses["http"]
        verify = ssl.create_default_context(cafile=cert)
        async with httpx.AsyncClient(base_url=f"https://{host}:{port}", verify=verify, http2=http2) as client:
            response = await client.post("/v1/tokens", json={"n": 2})
    assert response.http_version == version
    assert response.text.endswith('event: end\ndata: {"chunks":2}\n\n')


def test_tls_needs_both_files():
    """A certificate without its key (or the reverse) is refused with a clear message."""
    with pytest.raises(ValueError, match="both certfile and keyfile"):
        HttpTransport(certfile="cert.pem")


async def test_http1_reset_mid_stream_cancels_the_handler():
    """An HTTP/1.1 client that resets its connection (SO_LINGER 0) mid-stream gets its handler cancelled."""
    import socket
    import struct

    probe = Probe()
    async with serving(probe) as (handle, _):
        async with await trio.open_tcp_stream(*handle.addresses["http"]) as raw:
            body = b'{"n": 100000, "gap": 0.005}'
            await raw.send_all(
                b"POST /v1/tokens HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
            )
            received = b""
            while b"data:" not in received:
                received += await raw.receive_some(4096)
            raw.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await _assert_cancelled_as_disconnect(handle, probe)


async def _assert_cancelled_as_disconnect(handle, probe: Probe) -> None:
    """The tokens handler was cancelled promptly and its request counted as disconnected."""
    with trio.fail_after(5):
        await probe.finished.wait()
    await handle.binding("http", "tokens").tracker.wait_idle()
    assert probe.cancelled
    labels = {"endpoint": "tokens", "transport": "http"}
    assert sample(handle.runtime, "ingress_requests_total", **labels, outcome="disconnected") == 1


async def test_h2c_upgrade_from_http1():
    """A cleartext HTTP/1.1 request with Upgrade: h2c is switched to HTTP/2 (curl is the client that can)."""
    import shutil

    curl = shutil.which("curl")
    if curl is None or b"HTTP2" not in (await trio.run_process([curl, "-V"], capture_stdout=True)).stdout:
        pytest.skip("needs curl built with HTTP/2, the one client here that does h2c Upgrade")
    async with serving(Probe()) as (handle, _):
        host, port = handle.addresses["http"]
        command = [
            curl,
            "-s",
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version}",
            f"http://{host}:{port}/health",
        ]
        result = await trio.run_process(command, capture_stdout=True)
    assert result.stdout == b"2"


async def test_an_early_404_leaves_the_keep_alive_connection_open_for_the_next_request():
    """A 404 whose body arrives after its head still lets the same connection carry the next request."""
    head = b"POST /v1/missing HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\n"
    async with (
        serving(Probe()) as (handle, _),
        await trio.open_tcp_stream(*handle.addresses["http"]) as stream,
    ):
        responses = []
        for _ in range(2):
            await stream.send_all(head)  # as httpx does: the head, then the body in a second write
            await trio.testing.wait_all_tasks_blocked()  # the server has done all it can with the head
            await stream.send_all(b"{}")
            response = b""
            with trio.fail_after(5):
                while not response.endswith(b"}}"):
                    data = await stream.receive_some(65536)
                    if not data:
                        break  # closed: hypercorn could not reuse the connection
                    response += data
            responses.append(response[:12])
    assert responses == [b"HTTP/1.1 404", b"HTTP/1.1 404"]


async def test_kill_route_finds_a_request_id_with_an_escaped_slash_and_404s_a_finished_one():
    """POST /v1/{endpoint}/{id}/kill reaches an id containing "/" (sent as %2F); a finished id is a 404."""
    probe = Probe()
    async with serving(probe) as (_, client):
        async with trio.open_nursery() as nursery:
            answers: list[httpx.Response] = []

            async def stream() -> None:
                headers = {"x-request-id": "tenant/42 a%b"}
                answers.append(
                    await client.post("/v1/tokens", json={"n": 1000, "gap": 0.01}, headers=headers)
                )

            nursery.start_soon(stream)
            await probe.started.wait()
            killed = await client.post("/v1/tokens/tenant%2F42%20a%25b/kill")
        assert killed.status_code == 202 and killed.json() == {"signal": "kill", "requests": 1}
        assert probe.cancelled
        (answer,) = answers
        assert '"CANCELLED"' in answer.text  # a 499, or an error event if a chunk went first
        gone = await client.post("/v1/tokens/tenant%2F42%20a%25b/stop")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "NOT_FOUND"


async def test_a_stalled_upload_is_not_in_flight_and_does_not_hold_the_drain():
    """Headers sent, body stalled: nothing is accepted yet, so SIGTERM drains at once, unforced."""
    async with serving(Probe()) as (handle, _):
        host, port = handle.addresses["http"]
        async with await trio.open_tcp_stream(host, port) as stream:
            await stream.send_all(
                b"POST /v1/echo HTTP/1.1\r\nhost: t\r\ncontent-length: 1000\r\n\r\n"
                + b'{"pad": "'
                + b"x" * 10
            )
            with trio.fail_after(10):
                await trio.testing.wait_all_tasks_blocked()  # the app is parked reading the body
                assert handle.statistics().in_flight == 0
                handle.shutdown("test")
                result = await handle.wait_drained()
    assert result.forced is False and result.killed == 0
