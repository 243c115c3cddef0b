"""Real worker processes: SIGTERM mid-stream, a forced drain, the CLI, /metrics and /ready."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys

import httpx
import pytest
import trio

from runtime import EXIT_DRAIN_FORCED, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, ErrorCode, RemoteError
from runtime.testing import nats_server, worker_process
from transports.tcp import TcpClient

EPHEMERAL = ("--tcp", "127.0.0.1:0", "--metrics", "127.0.0.1:0")


async def _collect(
    client: TcpClient, request: dict, into: dict[int, object], key: int, first: trio.Event
) -> None:
    """Stream into ``into[key]`` (the indexes, or the error); ``first`` is set on the first chunk."""
    indexes: list[int] = []
    try:
        async for chunk in client.stream("generate", request):
            indexes.append(chunk["index"])
            first.set()
        into[key] = indexes
    except RemoteError as error:
        into[key] = error


async def _start_streams(
    nursery: trio.Nursery, client: TcpClient, request: dict, count: int
) -> dict[int, object]:
    """Start ``count`` streams and return once every one has received its first chunk."""
    results: dict[int, object] = {}
    firsts = [trio.Event() for _ in range(count)]
    for k in range(count):
        nursery.start_soon(_collect, client, request, results, k, firsts[k])
    for event in firsts:
        await event.wait()
    return results


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
async def test_a_shutdown_signal_mid_stream_finishes_every_stream_and_exits_zero(signum):
    """A worker given SIGTERM, SIGINT or SIGHUP with streams in flight completes all of them, exits 0."""
    async with worker_process(*EPHEMERAL) as worker:
        async with TcpClient.connect(*worker.addresses["tcp"]) as client, trio.open_nursery() as nursery:
            results = await _start_streams(nursery, client, {"max_tokens": 40, "itl_ms": 10}, 8)
            worker.send_signal(signum)
        assert await worker.wait_exit() == EXIT_OK
    assert results == {k: list(range(40)) for k in range(8)}
    assert any(e["event"] == "shutdown.phase3.started" and e["forced"] is False for e in worker.events)


async def test_drain_that_cannot_finish_kills_the_rest_and_exits_forced():
    """When drain_timeout passes, running streams end with SHUTTING_DOWN and the exit code says forced."""
    async with worker_process(*EPHEMERAL, "--drain-timeout", "0.5") as worker:
        async with TcpClient.connect(*worker.addresses["tcp"]) as client, trio.open_nursery() as nursery:
            results = await _start_streams(nursery, client, {"max_tokens": 100000, "itl_ms": 10}, 4)
            worker.send_signal(signal.SIGTERM)
        assert await worker.wait_exit() == EXIT_DRAIN_FORCED
    for outcome in results.values():
        assert isinstance(outcome, RemoteError) and outcome.code is ErrorCode.SHUTTING_DOWN


async def test_metrics_ready_and_inflight_over_http():
    """/metrics reports in-flight back at 0 after traffic; /ready is 200 serving and 503 once draining."""
    async with worker_process(*EPHEMERAL, "--shutdown-delay", "30", "--drain-timeout", "60") as worker:
        host, port = worker.addresses["metrics"]
        async with TcpClient.connect(*worker.addresses["tcp"]) as client:
            assert await client.call("echo", {"x": 1}) == {"x": 1}
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as http:
            assert (await http.get("/ready")).status_code == 200
            assert (await http.get("/health")).status_code == 200
            metrics = (await http.get("/metrics")).text
            assert 'ingress_inflight_requests{endpoint="echo",transport="tcp"} 0.0' in metrics
            assert 'ingress_requests_total{endpoint="echo",outcome="ok",transport="tcp"} 1.0' in metrics
            worker.send_signal(signal.SIGTERM)
            await worker.wait_event("shutdown.requested")
            assert (await http.get("/ready")).status_code == 503
            assert (await http.get("/health")).status_code == 200
        worker.send_signal(signal.SIGINT)  # the second signal skips the 30 s delay
        assert await worker.wait_exit() == EXIT_OK


def _cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


async def test_cli_call_prints_chunks_and_reports_remote_errors():
    """`ingress call` prints one JSON line per chunk; a remote error goes to stderr with a non-zero exit."""
    async with worker_process("--tcp", "127.0.0.1:0") as worker:
        host, port = worker.addresses["tcp"]
        ok = await trio.to_thread.run_sync(
            lambda: _cli("call", "generate", '{"max_tokens": 3}', "--tcp", f"{host}:{port}")
        )
        missing = await trio.to_thread.run_sync(lambda: _cli("call", "nope", "--tcp", f"{host}:{port}"))
        worker.send_signal(signal.SIGTERM)
        assert await worker.wait_exit() == EXIT_OK
    assert ok.returncode == 0
    assert ok.stdout.splitlines() == [f'{{"index": {i}, "token": "tok{i}"}}' for i in range(3)]
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr and "nope" in missing.stderr


async def test_cli_call_over_http_prints_chunks_and_reports_remote_errors():
    """`ingress call --http URL` streams chunks as JSON lines and reports errors like the TCP form."""
    async with worker_process("--http", "127.0.0.1:0") as worker:
        host, port = worker.addresses["http"]
        url = f"http://{host}:{port}"
        stream = await trio.to_thread.run_sync(
            lambda: _cli("call", "generate", '{"max_tokens": 3}', "--http", url)
        )
        unary = await trio.to_thread.run_sync(lambda: _cli("call", "echo", '{"a": [1]}', "--http", url))
        bad = await trio.to_thread.run_sync(
            lambda: _cli("call", "generate", '{"max_tokens": -1}', "--http", url)
        )
        worker.send_signal(signal.SIGTERM)
        assert await worker.wait_exit() == EXIT_OK
    assert stream.returncode == 0
    assert stream.stdout.splitlines() == [f'{{"index": {i}, "token": "tok{i}"}}' for i in range(3)]
    assert unary.stdout == '{"a": [1]}\n'
    assert bad.returncode == 1 and "BAD_REQUEST" in bad.stderr and "max_tokens" in bad.stderr


async def test_cli_serve_and_call_over_nats():
    """`ingress serve/call --nats` stream chunks; a clean SIGTERM is not logged as a NATS outage."""

    async with nats_server() as url, worker_process("--nats", url, "--tcp", "127.0.0.1:0") as worker:
        result = await trio.to_thread.run_sync(
            lambda: _cli("call", "generate", '{"max_tokens": 2}', "--nats", url)
        )
        worker.send_signal(signal.SIGTERM)
        assert await worker.wait_exit() == EXIT_OK
        await worker.wait_event("worker.stopped")
    assert not [e for e in worker.events if e["event"] in ("nats.disconnected", "nats.error")]
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f'{{"index": {i}, "token": "tok{i}"}}' for i in range(2)]


def test_cli_usage_errors_exit_two_with_a_message():
    """Bad JSON, a bad address or an APP that is not a Worker exit 2 with a message that says what to fix."""
    bad_json = _cli("call", "echo", "{oops", "--tcp", "127.0.0.1:1")
    assert bad_json.returncode == EXIT_USAGE and "not valid JSON" in bad_json.stderr
    bad_address = _cli("serve", "--tcp", "localhost")
    assert bad_address.returncode == EXIT_USAGE and "HOST:PORT" in bad_address.stderr
    bad_url = _cli("call", "echo", "--http", "ftp://example")
    assert bad_url.returncode == EXIT_USAGE and "http://127.0.0.1:8000" in bad_url.stderr
    bad_app = _cli("serve", "json:dumps", "--tcp", "127.0.0.1:0")
    assert bad_app.returncode == EXIT_USAGE and "not a runtime.Worker" in bad_app.stderr


@pytest.mark.parametrize("target", [("--tcp", "127.0.0.1:1"), ("--nats", "nats://127.0.0.1:1")])
def test_cli_call_to_a_closed_port_says_unavailable(target):
    """Calling a port nobody listens on fails fast with a retryable UNAVAILABLE, not a traceback."""
    result = _cli("call", "echo", *target)
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr and "retryable: true" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_transport_that_cannot_start_exits_one_with_a_log_line_not_a_traceback():
    """A port already in use fails the start-up: exit 1 and a worker.startup_failed line naming it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _cli("serve", "--tcp", f"127.0.0.1:{port}", "--log-format", "json")
    assert result.returncode == EXIT_FAILURE
    failed = [json.loads(line) for line in result.stdout.splitlines() if "worker.startup_failed" in line]
    assert failed and failed[0]["transport"] == "tcp" and "Address already in use" in failed[0]["error"]
    assert f"127.0.0.1:{port}" in failed[0]["error"]  # which of the worker's ports
    assert "Traceback" not in result.stdout + result.stderr


async def test_sigterm_while_waiting_for_nats_at_start_up_exits_zero_at_once():
    """A worker still trying to reach NATS at start-up stops on SIGTERM (nothing to drain), exit 0."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        url = f"nats://127.0.0.1:{unused.getsockname()[1]}"
        async with worker_process("--nats", url, wait_ready=False) as worker:
            with trio.fail_after(20):
                await worker.wait_event("nats.connect_failed")
                worker.send_signal(signal.SIGTERM)
                assert await worker.wait_exit() == EXIT_OK
    assert [e for e in worker.events if e["event"] == "worker.startup_aborted"]
    assert not [e for e in worker.events if e["event"] == "worker.ready"]


async def test_a_nats_server_unreachable_for_the_whole_start_up_window_exits_one():
    """A NATS server that stays unreachable past --nats-startup-timeout fails the start-up: exit 1."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        url = f"nats://127.0.0.1:{unused.getsockname()[1]}"
        async with worker_process("--nats", url, "--nats-startup-timeout", "0.5", wait_ready=False) as worker:
            with trio.fail_after(20):
                assert await worker.wait_exit() == EXIT_FAILURE
                failed = await worker.wait_event("worker.startup_failed")
    assert failed["transport"] == "nats" and "cannot reach" in failed["error"]
    assert [e for e in worker.events if e["event"] == "nats.connect_failed"]  # it did try again first


@pytest.mark.parametrize("server_at_sigterm", ["back", "gone again"])
async def test_a_worker_survives_a_nats_server_restart_and_exits_zero_on_sigterm(server_at_sigterm):
    """After a NATS server restart the worker serves again and a later SIGTERM exits 0, server up or not."""
    from runtime.testing import start_nats_server
    from transports.nats import NatsClient

    async with trio.open_nursery() as servers:
        first, url = await start_nats_server(servers)
        async with worker_process("--nats", url, "--tcp", "127.0.0.1:0") as worker:
            first.terminate()
            await first.wait()
            second, _ = await start_nats_server(servers, int(url.rsplit(":", 1)[1]))
            try:
                with trio.fail_after(20):
                    await worker.wait_event("nats.reconnected")
                    async with NatsClient.connect(url) as client:
                        answer = await client.call("echo", {"back": True})
                    if server_at_sigterm == "gone again":
                        second.terminate()
                        await second.wait()
                        await worker.wait_event("nats.disconnected", nth=2)
                    worker.send_signal(signal.SIGTERM)
                    assert await worker.wait_exit() == EXIT_OK
            finally:
                second.terminate()
                with trio.move_on_after(10, shield=True):
                    await second.wait()
    assert answer == {"back": True}
    assert not [e for e in worker.events if e["event"] == "unparsed" and "Traceback" in e["line"]]


@pytest.mark.parametrize("url", ["notaurl", "http://127.0.0.1:4222", "nats://", "nats://127.0.0.1:99999"])
@pytest.mark.parametrize("command", ["serve", "call"])
def test_a_malformed_nats_url_is_a_usage_error_at_once(command, url):
    """`--nats` with something that is not a NATS URL exits 2 with the expected form, without retrying."""
    args = ["serve", "--nats", url] if command == "serve" else ["call", "echo", "--nats", url]
    result = _cli(*args)
    assert result.returncode == EXIT_USAGE
    assert "nats://127.0.0.1:4222" in result.stderr and repr(url) in result.stderr


@pytest.mark.parametrize(
    "url", ["nats://127.0.0.1:4222", "tls://nats.internal", "ws://[::1]:8080", "wss://h"]
)
def test_nats_urls_nats_py_can_reach_are_accepted(url):
    """The URL check lets through every scheme nats-py connects to, with or without a port."""
    from transports.nats import NatsTransport

    assert NatsTransport(url).url == url


def test_a_malformed_nats_url_fails_the_transport_and_the_client_at_once():
    """Embedding code gets ValueError from NatsTransport and NatsClient.connect for a malformed URL."""
    from transports.nats import NatsClient, NatsTransport

    with pytest.raises(ValueError, match="expected a NATS URL"):
        NatsTransport("http://127.0.0.1:4222")

    async def connect() -> None:
        async with NatsClient.connect("127.0.0.1:4222"):
            pass

    with pytest.raises(ValueError, match="expected a NATS URL"):
        trio.run(connect)


@pytest.mark.skipif(
    shutil.which("prlimit") is None, reason="needs prlimit (util-linux) to lower the fd limit"
)
async def test_past_the_descriptor_limit_the_worker_warns_once_and_serves_again():
    """With RLIMIT_NOFILE exhausted by idle clients: one warning line, no traceback, then served again."""
    from runtime.testing import spawn_process

    command = ["prlimit", "--nofile=64", sys.executable, "-m", "runtime", "serve", *EPHEMERAL]
    async with spawn_process([*command, "--log-format", "json"]) as worker:
        address = worker.addresses["tcp"]
        hogs = [await trio.open_tcp_stream(*address) for _ in range(80)]  # more than the worker can take
        with trio.fail_after(20):
            await worker.wait_event("listener.accept_failing")
        for hog in hogs:
            await hog.aclose()
        with trio.fail_after(20):
            async with TcpClient.connect(*address) as client:
                answer = await client.call("echo", {"after": "exhaustion"})
        worker.send_signal(signal.SIGTERM)
        assert await worker.wait_exit() == EXIT_OK
    assert answer == {"after": "exhaustion"}
    assert len([e for e in worker.events if e["event"] == "listener.accept_failing"]) <= 2
    assert not [e for e in worker.events if e["event"] == "unparsed" and "Traceback" in e["line"]]


@pytest.mark.parametrize("transport", ["tcp", "http", "nats"])
async def test_cli_call_timeout_reaches_the_worker_as_its_deadline(transport):
    """`ingress call --timeout` is the worker's deadline on every transport: DEADLINE_EXCEEDED, logged so."""
    from runtime.testing import nats_server

    async with contextlib.AsyncExitStack() as stack:
        args = ["--tcp", "127.0.0.1:0", "--http", "127.0.0.1:0"]
        if transport == "nats":
            url = await stack.enter_async_context(nats_server())
            args += ["--nats", url]
        worker = await stack.enter_async_context(worker_process(*args, "--log-format", "json"))
        if transport == "nats":
            target = ["--nats", url]
        else:
            host, port = worker.addresses[transport]
            target = (
                ["--tcp", f"{host}:{port}"] if transport == "tcp" else ["--http", f"http://{host}:{port}"]
            )
        request = '{"max_tokens": 100000, "itl_ms": 20}'
        result = await trio.to_thread.run_sync(
            lambda: _cli("call", "generate", request, *target, "--timeout", "0.3")
        )
        logged = await worker.wait_event("request")
    assert result.returncode == 1 and "DEADLINE_EXCEEDED" in result.stderr, result.stderr
    assert logged["outcome"] == "error" and logged["code"] == "DEADLINE_EXCEEDED"


def test_cli_call_reads_the_request_from_stdin_or_a_file(tmp_path):
    """`ingress call echo -` reads stdin, `@FILE` a file; a missing or non-UTF-8 file is exit 2 naming it."""
    request = {"big": "x" * 200_000}  # too big to be comfortable on a command line
    (tmp_path / "request.json").write_text(json.dumps(request))
    missing = _cli("call", "echo", f"@{tmp_path / 'nope.json'}", "--tcp", "127.0.0.1:1")
    assert missing.returncode == EXIT_USAGE and "nope.json" in missing.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "runtime", "call", "echo", "-", "--tcp", "127.0.0.1:1"],
        input="{oops",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert bad.returncode == EXIT_USAGE and "(stdin) is not valid JSON" in bad.stderr
    (tmp_path / "latin1.json").write_bytes(b'{"caf\xe9": 1}')
    latin1 = _cli("call", "echo", f"@{tmp_path / 'latin1.json'}", "--tcp", "127.0.0.1:1")
    assert (
        latin1.returncode == EXIT_USAGE
        and "is not UTF-8" in latin1.stderr
        and "Traceback" not in latin1.stderr
    )


async def test_cli_call_sends_a_request_from_a_file(tmp_path):
    """A 200 KB request from @FILE reaches the worker and comes back whole."""
    request = {"big": "x" * 200_000}
    (tmp_path / "request.json").write_text(json.dumps(request))
    async with worker_process("--tcp", "127.0.0.1:0") as worker:
        host, port = worker.addresses["tcp"]
        result = await trio.to_thread.run_sync(
            lambda: _cli("call", "echo", f"@{tmp_path / 'request.json'}", "--tcp", f"{host}:{port}")
        )
    assert result.returncode == 0 and json.loads(result.stdout) == request


async def test_cli_call_over_https_with_the_workers_ca(self_signed):
    """`ingress call --http https://... --cafile` reaches a worker serving TLS (httpx, ALPN h2)."""
    cert, key = self_signed
    async with worker_process("--http", "127.0.0.1:0", "--certfile", cert, "--keyfile", key) as worker:
        host, port = worker.addresses["http"]
        result = await trio.to_thread.run_sync(
            lambda: _cli(
                "call", "generate", '{"max_tokens": 2}', "--http", f"https://{host}:{port}", "--cafile", cert
            )
        )
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["index"] for line in result.stdout.splitlines()] == [0, 1]


def test_tls_flags_that_cannot_apply_are_usage_errors(self_signed, tmp_path):
    """TLS flags with no listener that serves TLS (NATS keeps its own), or naming a file that is not
    there, are exit 2 with a clear line."""
    cert, key = self_signed
    nats_only = _cli("serve", "--nats", "nats://127.0.0.1:1", "--certfile", cert, "--keyfile", key)
    assert nats_only.returncode == EXIT_USAGE and "which is not given" in nats_only.stderr
    assert "NATS keeps its own TLS" in nats_only.stderr
    tls = ("--certfile", cert, "--keyfile", key, "--client-ca", cert)
    half_locked = _cli("serve", "--http", "127.0.0.1:0", "--nats", "nats://127.0.0.1:1", *tls)
    assert half_locked.returncode == EXIT_USAGE and "add --auth-tokens" in half_locked.stderr
    client_ca_alone = _cli("serve", "--tcp", "127.0.0.1:0", "--client-ca", cert)
    assert (
        client_ca_alone.returncode == EXIT_USAGE
        and "--client-ca (mutual TLS) needs" in client_ca_alone.stderr
    )
    missing = _cli(
        "serve", "--http", "127.0.0.1:0", "--certfile", str(tmp_path / "nope.pem"), "--keyfile", key
    )
    assert missing.returncode == EXIT_USAGE and "nope.pem" in missing.stderr
    missing_ca = _cli("call", "echo", "--http", "https://127.0.0.1:1", "--cafile", str(tmp_path / "ca.pem"))
    assert missing_ca.returncode == EXIT_USAGE and "ca.pem" in missing_ca.stderr


async def test_cli_call_duplex_sends_stdin_lines_and_prints_every_answer():
    """`ingress call chat --duplex`: NDJSON lines of stdin are the messages, over TCP, HTTP and NATS."""
    async with (
        nats_server() as url,
        worker_process("--tcp", "127.0.0.1:0", "--http", "127.0.0.1:0", "--nats", url) as worker,
    ):
        tcp, http = worker.addresses["tcp"], worker.addresses["http"]
        stdin = '{"max_tokens": 2}\n{"max_tokens": 1}\n'
        results = []
        targets = (
            ["--tcp", f"{tcp[0]}:{tcp[1]}"],
            ["--http", f"http://{http[0]}:{http[1]}"],
            ["--nats", url],
        )
        for target in targets:
            command = [sys.executable, "-m", "runtime", "call", "chat", "--duplex", *target]
            results.append(
                await trio.run_process(command, stdin=stdin.encode(), capture_stdout=True, check=False)
            )
    for result in results:
        answers = [json.loads(line) for line in result.stdout.decode().splitlines()]
        assert result.returncode == EXIT_OK and [(a["turn"], a["index"]) for a in answers] == [
            (0, 0),
            (0, 1),
            (1, 0),
        ]


async def test_cli_call_duplex_reports_a_bad_input_line_as_an_error_line():
    """A line of stdin that is not JSON: `error: BAD_REQUEST ...` and exit 1, no traceback."""
    async with worker_process("--tcp", "127.0.0.1:0") as worker:
        host, port = worker.addresses["tcp"]
        command = [sys.executable, "-m", "runtime", "call", "chat", "--duplex", "--tcp", f"{host}:{port}"]
        result = await trio.run_process(
            command,
            stdin=b'{"max_tokens": 1}\nnot json\n',
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    stderr = result.stderr.decode()
    assert result.returncode == EXIT_FAILURE and "error: BAD_REQUEST" in stderr and "Traceback" not in stderr
