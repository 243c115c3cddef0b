"""Start-up gated on the engine: the listeners open first, readiness and requests wait for the model
load (the mocker's INGRESS_MOCKER_LOAD_S); a user health check takes a worker out of rotation and
puts it back, without stopping it."""

from __future__ import annotations

import signal

import httpx
import pytest
import trio

from runtime import (
    EXIT_ENGINE_FAILED,
    EXIT_OK,
    ErrorCode,
    RemoteError,
    RetryBudget,
    Worker,
    WorkerConfig,
    open_worker,
)
from runtime.testing import nats_server, worker_process
from transports.nats import NatsClient
from transports.tcp import TcpClient, TcpTransport

# A model load that outlasts the test, which ends it with SIGTERM.
LOADING = {"INGRESS_MOCKER_LOAD_S": "600"}
LISTENERS = ("--tcp", "127.0.0.1:0", "--http", "127.0.0.1:0", "--metrics", "127.0.0.1:0")


def _url(address: tuple[str, int], path: str) -> str:
    return f"http://{address[0]}:{address[1]}{path}"


async def test_while_the_model_loads_probes_answer_and_every_transport_refuses_retryably():
    """During the load: /health 200, /ready 503 (starting), HTTP 503 + Retry-After, TCP UNAVAILABLE
    retryable, no NATS subscription; SIGTERM then exits 0 at once."""
    async with (
        nats_server() as nats_url,
        worker_process(*LISTENERS, "--nats", nats_url, wait_ready=False, env=LOADING) as worker,
    ):
        with trio.fail_after(30):
            await worker.wait_event("worker.listening")
        metrics, http = worker.addresses["metrics"], worker.addresses["http"]
        async with httpx.AsyncClient() as client:
            assert (await client.get(_url(metrics, "/health"))).status_code == 200
            ready = await client.get(_url(metrics, "/ready"))
            assert ready.status_code == 503 and "starting" in ready.text
            answer = await client.post(_url(http, "/v1/echo"), json={"x": 1})
            assert answer.status_code == 503 and int(answer.headers["retry-after"]) > 0
            error = answer.json()["error"]
            assert (error["code"], error["retryable"]) == ("UNAVAILABLE", True)
            assert "starting" in error["message"]
            scraped = (await client.get(_url(metrics, "/metrics"))).text
        assert "ingress_ready 0.0" in scraped
        assert 'reason="starting"' in scraped
        async with TcpClient.connect(*worker.addresses["tcp"]) as tcp:
            with pytest.raises(RemoteError) as caught:
                await tcp.call("echo", {"x": 1})
        assert caught.value.code is ErrorCode.UNAVAILABLE and caught.value.retryable
        # Not subscribed yet: the NATS server itself says nobody answers (a queue group would send
        # the request to the other workers).
        async with NatsClient.connect(nats_url, retry_budget=RetryBudget(ratio=0, reserve=0)) as nats:
            with pytest.raises(RemoteError) as refused:
                await nats.call("echo", {"x": 1})
        assert refused.value.code is ErrorCode.UNAVAILABLE and refused.value.retryable
        worker.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await worker.wait_exit() == EXIT_OK
    events = [e["event"] for e in worker.events]
    assert "worker.ready" not in events and "worker.startup_aborted" in events


async def test_once_the_model_is_loaded_the_worker_is_ready_and_serves():
    """The order is listening, engine started, ready; then every transport serves."""
    async with (
        nats_server() as nats_url,
        worker_process(*LISTENERS, "--nats", nats_url, env={"INGRESS_MOCKER_LOAD_S": "0.2"}) as worker,
    ):
        events = [e["event"] for e in worker.events]
        assert events.index("worker.listening") < events.index("worker.engine_started")
        assert events.index("worker.engine_started") < events.index("worker.ready")
        async with httpx.AsyncClient() as client:
            assert (await client.get(_url(worker.addresses["metrics"], "/ready"))).status_code == 200
            answer = await client.post(_url(worker.addresses["http"], "/v1/echo"), json={"x": 1})
            assert answer.json() == {"x": 1}
        async with TcpClient.connect(*worker.addresses["tcp"]) as tcp:
            assert await tcp.call("echo", {"x": 2}) == {"x": 2}
        async with NatsClient.connect(nats_url) as nats:
            assert await nats.call("echo", {"x": 3}) == {"x": 3}  # subscribed before it said ready


async def test_a_model_load_that_fails_exits_four_with_its_reason():
    """A lifespan that raises (here, a malformed INGRESS_MOCKER_LOAD_S) is exit code 4, said in one line."""
    async with worker_process(*LISTENERS, wait_ready=False, env={"INGRESS_MOCKER_LOAD_S": "soon"}) as worker:
        with trio.fail_after(30):
            assert await worker.wait_exit() == EXIT_ENGINE_FAILED
    [failed] = [e for e in worker.events if e["event"] == "worker.startup_failed"]
    assert "INGRESS_MOCKER_LOAD_S must be a number of seconds" in failed["error"]


def _health_worker(state: dict[str, object]) -> Worker:
    worker = Worker("health-test")

    @worker.endpoint("echo")
    async def echo(request, ctx):
        return request

    @worker.health_check(interval=1.0, timeout=0.5)
    async def engine_alive(runtime):
        state["asked"] = int(state.get("asked", 0)) + 1  # type: ignore[call-overload]
        answer = state["answer"]
        if answer == "raise":
            raise RuntimeError("engine died")
        if answer == "hang":
            await trio.sleep_forever()
        return answer

    return worker


async def _until(predicate) -> None:
    """Wait (in virtual time: the tests here run on the autojump clock) until ``predicate()``."""
    with trio.fail_after(10):
        while not predicate():  # noqa: ASYNC110 -- readiness has no event; this is virtual time
            await trio.sleep(0.05)


async def test_a_failing_health_check_takes_the_worker_out_of_rotation_and_back(autojump_clock):
    """False, an exception or a hang past the timeout each make it not ready (saying why), and it
    still serves what comes; the next passing check makes it ready again."""
    state: dict[str, object] = {"answer": True}
    transport = TcpTransport(port=0)
    async with open_worker(_health_worker(state), [transport], WorkerConfig(drain_timeout=5)) as handle:
        await _until(lambda: state.get("asked") == 1)
        assert handle.ready
        for answer, says in [
            (False, "health check returned False"),
            ("raise", "health check failed: engine died"),
            ("hang", "health check took longer than 0.5 s"),
        ]:
            state["answer"] = answer
            await _until(lambda: not handle.ready)
            assert handle.readiness.reasons() == {"health": says}
            async with TcpClient.connect(*handle.addresses["tcp"]) as client:
                assert await client.call("echo", {"still": "served"}) == {"still": "served"}
            state["answer"] = None  # returning nothing passes
            await _until(lambda: handle.ready)
