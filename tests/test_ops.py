"""The ops routes (/health, /ready, /metrics) on the --metrics listener and on the HTTP port: any request
of any method or shape gets an answer or a closed connection, never a dead worker."""

from __future__ import annotations

import gzip

import httpx
import pytest
import trio

from runtime import Worker, open_worker
from runtime.mocker import create_mocker
from runtime.testing import worker_process
from transports.http import HttpTransport

# Each is sent on a fresh connection; every one of them once killed the worker or is a shape that might.
HOSTILE = {
    "HEAD /health": b"HEAD /health HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
    "HEAD /ready": b"HEAD /ready HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
    "HEAD /metrics": b"HEAD /metrics HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
    "HEAD unknown": b"HEAD /nope HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
    "HEAD pipelined": b"HEAD /metrics HTTP/1.1\r\nhost: t\r\n\r\nGET /health HTTP/1.1\r\nhost: t\r\n\r\n",
    "OPTIONS": b"OPTIONS /metrics HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
    "DELETE": b"DELETE /health HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
    "unknown method": b"BREW /coffee HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
    "asterisk": b"OPTIONS * HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
    "CONNECT": b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n",
    "websocket": (
        b"GET /health HTTP/1.1\r\nhost: t\r\nupgrade: websocket\r\nconnection: upgrade\r\n"
        b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
    ),
    "body on GET": b"GET /metrics HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
    "binary garbage": bytes(range(256)) * 4 + b"\r\n\r\n",
    "h2 preface then garbage": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64,
    "huge head": b"GET /health HTTP/1.1\r\nhost: t\r\nx-pad: " + b"a" * 100_000 + b"\r\n\r\n",
    "bad version": b"GET /health HTTP/9.9\r\nhost: t\r\n\r\n",
    "no host": b"GET /health HTTP/1.1\r\nconnection: close\r\n\r\n",
    "half a request": b"GET /heal",
}
# How long one hostile exchange may take before the test calls it a hang.
EXCHANGE_TIMEOUT = 10.0


async def _exchange(address: tuple[str, int], data: bytes) -> bytes:
    """Send ``data``, half-close, and read whatever comes back until the worker closes."""
    received = b""
    with trio.fail_after(EXCHANGE_TIMEOUT):
        async with await trio.open_tcp_stream(*address) as stream:
            try:
                await stream.send_all(data)
                await stream.send_eof()
                while chunk := await stream.receive_some(65536):
                    received += chunk
            except trio.BrokenResourceError:
                pass  # the worker refused the input by resetting: an answer too
    return received


@pytest.mark.parametrize("listener", ["metrics", "http"])
async def test_no_request_of_any_shape_ends_the_worker(listener):
    """HEAD, odd methods and garbage on the ops listener or the HTTP port: the worker keeps serving."""
    args = ("--http", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--no-access-log")
    async with worker_process(*args) as worker, httpx.AsyncClient() as client:
        answers = {name: await _exchange(worker.addresses[listener], data) for name, data in HOSTILE.items()}
        assert worker.process.returncode is None, worker.events[-5:]
        for name in ("metrics", "http"):
            host, port = worker.addresses[name]
            assert (await client.get(f"http://{host}:{port}/health")).status_code == 200, name
    for route in ("/health", "/ready", "/metrics"):
        head, _, body = answers[f"HEAD {route}"].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and body == b"", route
    assert answers["HEAD unknown"].startswith(b"HTTP/1.1 404 ")
    assert answers["HEAD pipelined"].count(b"HTTP/1.1 200 ") == 2
    if listener == "metrics":
        assert answers["DELETE"].startswith(b"HTTP/1.1 405 ") and b"allow: GET, HEAD" in answers["DELETE"]


def _worker() -> Worker:
    return create_mocker("ops-test")


@pytest.mark.parametrize("listener", ["metrics", "http"])
async def test_metrics_negotiate_openmetrics_and_gzip(listener):
    """/metrics speaks OpenMetrics when asked, Prometheus text otherwise, gzip-compressed on request."""
    async with open_worker(_worker(), [HttpTransport(port=0)], metrics_address=("127.0.0.1", 0)) as handle:
        host, port = handle.addresses[listener]
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
            await client.post(f"http://{host}:{handle.addresses['http'][1]}/v1/echo", json={})
            text = await client.get("/metrics", headers={"accept-encoding": "identity"})
            openmetrics = await client.get(
                "/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}
            )
            raw = await client.send(
                client.build_request("GET", "/metrics", headers={"accept-encoding": "gzip"}), stream=True
            )
            compressed = b"".join([chunk async for chunk in raw.aiter_raw()])
            await raw.aclose()
    assert text.headers["content-type"].startswith("text/plain")
    assert 'ingress_requests_total{endpoint="echo",outcome="ok",transport="http"} 1.0' in text.text
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")
    assert raw.headers["content-encoding"] == "gzip"
    assert b"ingress_requests_total" in gzip.decompress(compressed)


async def test_ready_follows_every_dependency_a_transport_reports_and_says_why():
    """A dependency reported down takes /ready (both listeners) and ingress_ready to 503/0, naming it."""
    worker = create_mocker()
    transport = HttpTransport(port=0)
    async with open_worker(worker, [transport], metrics_address=("127.0.0.1", 0)) as handle:
        urls = [f"http://{h}:{p}" for h, p in (handle.addresses["http"], handle.addresses["metrics"])]
        async with httpx.AsyncClient(timeout=10) as client:
            handle.readiness.report("broker", False, "lost the broker at 10.0.0.1")
            for url in urls:
                answer = await client.get(f"{url}/ready")
                assert answer.status_code == 503 and "broker: lost the broker at 10.0.0.1" in answer.text
            metrics = (await client.get(f"{urls[1]}/metrics")).text
            assert "ingress_ready 0.0" in metrics
            handle.readiness.report("broker", True)
            assert [(await client.get(f"{url}/ready")).status_code for url in urls] == [200, 200]
            assert "ingress_ready 1.0" in (await client.get(f"{urls[1]}/metrics")).text
