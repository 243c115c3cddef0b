"""The contract, part 4: the same requests are accounted for the same way on every transport. The
script runs once on the in-memory transport (the reference: the dispatcher with no wire), then on the
transport under test; metrics and canonical log lines must agree."""

from __future__ import annotations

from typing import Any

import trio
from structlog.testing import capture_logs

from runtime import WorkerConfig

from .app import Probe
from .drivers import open_driver, request_lines, samples
from .helpers import TEST_TIMEOUT

ENDPOINTS = ("echo", "tokens", "fail", "limited")

# What the script below must produce; the reference run is checked against it, so a change in the
# dispatcher's accounting shows here first, and every transport is then compared with the reference.
EXPECTED = {
    "requests": {
        ("echo", "ok"): 1,
        ("echo", "error"): 1,  # undecodable JSON: counted like any other error, on every transport
        ("tokens", "ok"): 1,
        ("fail", "error"): 2,
        ("limited", "ok"): 1,
        ("limited", "rejected"): 1,
    },
    "rejections": {("limited", "overloaded"): 1},
    "disconnects": {},
    "request log lines": {"ok": 3, "error": 3, "rejected": 1},
}


async def run_script(driver: Any) -> None:
    """Ok unary, ok stream, unknown endpoint, undecodable JSON, handler errors, admission rejection."""
    assert (await driver.call("echo", {"x": 1})).ok
    assert (await driver.call("tokens", {"n": 3})).ok
    # NOT_FOUND; on NATS "no responders" (UNAVAILABLE): never counted, there is no such endpoint to count
    assert (await driver.call("no-such-endpoint", {})).code in ("NOT_FOUND", "UNAVAILABLE")
    assert (await driver.call("echo", b"{oops")).code == "BAD_REQUEST"
    assert (await driver.call("fail", {"code": "BAD_REQUEST", "message": "fix it"})).code == "BAD_REQUEST"
    assert (await driver.call("fail", {"plain": "boom"})).code == "INTERNAL"
    async with driver.open("limited", {}) as running:
        await driver.probe.held.wait()
        assert (await driver.call("limited", {})).code == "OVERLOADED"
        driver.probe.release.set()
        assert (await running.finish()).ok
    for endpoint in ENDPOINTS:
        await driver.idle(endpoint)


def accounting(driver: Any, logs: list[dict[str, Any]]) -> dict[str, Any]:
    handle, transport = driver.handle, driver.transport
    return {
        "requests": samples(handle, "ingress_requests_total", transport, "endpoint", "outcome"),
        "rejections": samples(handle, "ingress_rejections_total", transport, "endpoint", "reason"),
        "disconnects": samples(handle, "ingress_client_disconnects_total", transport, "endpoint", "reason"),
        "request log lines": dict(request_lines(logs, transport)),
    }


async def test_accounting_is_identical_for_the_same_script(driver):
    """The same script gives the same ingress_requests_total by (endpoint, outcome), the same
    ingress_rejections_total by reason and the same request log lines by outcome as on memory."""
    with trio.fail_after(TEST_TIMEOUT):
        with capture_logs() as reference_logs:
            async with open_driver("memory", Probe(), WorkerConfig()) as reference:
                await run_script(reference)
                expected = accounting(reference, reference_logs)
        with capture_logs() as logs:
            await run_script(driver)
        measured = accounting(driver, logs)
    assert expected == EXPECTED
    assert measured == expected
