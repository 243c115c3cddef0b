"""The worker's live state: ``handle.status()``, ``GET /status`` on the ops listener and the HTTP
transport, and ``ingress status --http``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import httpx
import trio

from runtime import EXIT_FAILURE, EXIT_OK, RemoteError, Worker, WorkerConfig, open_worker
from runtime.testing import worker_process
from transports.tcp import TcpClient, TcpTransport


def _busy_worker(release: trio.Event) -> Worker:
    worker = Worker("status-test")

    @worker.endpoint("hold", max_concurrency=1, max_queue=2)
    async def hold(request, ctx):
        await release.wait()
        return "done"

    @worker.endpoint("echo")
    async def echo(request, ctx):
        return request

    return worker


async def test_status_and_metrics_report_running_queued_limits_and_phase():
    """One request running and one queued behind max_concurrency=1 show as such in the status and the
    load gauges, with the limits; the phase goes from serving to draining with the reason."""
    release = trio.Event()
    transport = TcpTransport(port=0)
    config = WorkerConfig(drain_timeout=5)
    ops = ("127.0.0.1", 0)
    async with open_worker(_busy_worker(release), [transport], config, metrics_address=ops) as handle:
        status = handle.status()
        assert (status["worker"], status["phase"], status["ready"]) == ("status-test", "serving", True)
        assert status["not_ready_because"] == {} and status["in_flight"] == 0
        assert status["endpoints"]["echo"] == {
            "running": 0,
            "queued": 0,
            "max_concurrency": None,
            "max_queue": 0,
        }
        outcomes: list[str] = []

        async def hold() -> None:
            try:
                outcomes.append(await client.call("hold"))
            except RemoteError as error:  # the queued one, when the drain closes admission first
                outcomes.append(error.code.name)

        async with TcpClient.connect(*handle.addresses["tcp"]) as client, trio.open_nursery() as calls:
            for _ in range(2):
                calls.start_soon(hold)
            with trio.fail_after(5):
                while handle.status()["endpoints"]["hold"]["queued"] < 1:  # noqa: ASYNC110 -- a snapshot API
                    await trio.sleep(0.01)
            status = handle.status()
            assert status["endpoints"]["hold"] == {
                "running": 1,
                "queued": 1,
                "max_concurrency": 1,
                "max_queue": 2,
            }
            assert status["in_flight"] == 2
            host, port = handle.addresses["metrics"]
            async with httpx.AsyncClient() as http:
                scraped = (await http.get(f"http://{host}:{port}/metrics")).text
            for line in (
                'ingress_endpoint_running{endpoint="hold"} 1.0',
                'ingress_endpoint_queued{endpoint="hold"} 1.0',
                'ingress_endpoint_capacity{endpoint="hold"} 1.0',
                'ingress_endpoint_saturation{endpoint="hold"} 2.0',
                'ingress_endpoint_capacity{endpoint="echo"} +Inf',
                'ingress_endpoint_saturation{endpoint="echo"} 0.0',
            ):
                assert line in scraped.splitlines(), line
            handle.shutdown("test")
            status = handle.status()
            assert (status["phase"], status["ready"]) == ("draining", False)
            assert status["not_ready_because"] == {"worker": "draining: shutting down"}
            release.set()
    assert "done" in outcomes and set(outcomes) <= {"done", "SHUTTING_DOWN"}


async def test_status_over_http_and_the_cli_while_the_model_loads():
    """GET /status (ops listener and HTTP port), `ingress status --http` and `--tcp` print phase starting
    and why; an unreachable worker is one line on stderr and exit 1."""
    args = ("--http", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--tcp", "127.0.0.1:0")
    async with worker_process(*args, wait_ready=False, env={"INGRESS_MOCKER_LOAD_S": "600"}) as worker:
        with trio.fail_after(30):
            await worker.wait_event("worker.listening")
        async with httpx.AsyncClient() as client:
            for name in ("metrics", "http"):
                host, port = worker.addresses[name]
                answer = await client.get(f"http://{host}:{port}/status")
                assert answer.status_code == 200
                assert answer.headers["content-type"] == "application/json"
                assert answer.json()["phase"] == "starting"
        for flag, name in (("--http", "metrics"), ("--tcp", "tcp")):
            host, port = worker.addresses[name]
            printed = await trio.to_thread.run_sync(lambda: _cli("status", flag, f"{host}:{port}"))  # noqa: B023
            assert printed.returncode == EXIT_OK, printed.stderr
            [line] = printed.stdout.splitlines()
            report = json.loads(line)
            assert (report["phase"], report["ready"]) == ("starting", False)
            assert report["not_ready_because"] == {"worker": "starting: the engine is not up yet"}
            assert set(report["endpoints"]) == {"chat", "echo", "generate"}
        host, port = worker.addresses["metrics"]
        worker.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await worker.wait_exit() == EXIT_OK
    gone = await trio.to_thread.run_sync(lambda: _cli("status", "--http", f"{host}:{port}"))
    assert gone.returncode == EXIT_FAILURE and gone.stderr.startswith("error: UNAVAILABLE: no status from")
    host, port = worker.addresses["tcp"]
    gone = await trio.to_thread.run_sync(lambda: _cli("status", "--tcp", f"{host}:{port}"))
    assert gone.returncode == EXIT_FAILURE and gone.stderr.startswith("error: UNAVAILABLE: cannot connect")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "runtime", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
