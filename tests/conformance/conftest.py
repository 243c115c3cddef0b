"""The ``driver`` fixture: the conformance worker served on one transport, once per transport.

Markers a contract test may carry:

- ``@pytest.mark.worker_config(drain_timeout=...)``: ``WorkerConfig`` fields for this test's worker
  (over ``DEFAULT_CONFIG``);
- ``@pytest.mark.needs("capability", reason=...)``: skip the drivers whose class lacks it (say, a timeout
  that can be malformed);
- ``@pytest.mark.deviates(nats="why")``: a documented difference of that transport from the contract;
  the test is a strict xfail there, so it fails the day the difference goes away.
- ``@pytest.mark.bug(h2="what")``: a runtime bug this contract found on that transport, reported; a
  strict xfail there, so it fails the day the fix lands (then the marker goes).
- ``@pytest.mark.pending(tcp="why")``: work in progress on that transport; a non-strict xfail there
  until it lands (then the marker goes).

The ``exchange_driver`` fixture does the same for the exchange contract (exchange_drivers.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from runtime import WorkerConfig

from .app import ExchangeProbe, Probe
from .drivers import DRIVERS, open_driver
from .exchange_drivers import EXCHANGE_DRIVERS, open_exchange_driver

# A drain that nothing in a test holds up ends at once; one that something does is cut in 5 s.
DEFAULT_CONFIG: dict[str, Any] = {"drain_timeout": 5.0, "kill_grace": 1.0}


def pytest_configure(config: pytest.Config) -> None:
    for line in (
        "worker_config(**fields): WorkerConfig fields for this test's conformance worker",
        "needs(*capabilities, reason): run only on drivers that have these capabilities",
        "deviates(**reasons): a transport's documented deviation from this contract (strict xfail)",
        "bug(**reasons): a runtime bug found on a transport, reported (strict xfail until fixed)",
        "pending(**reasons): work in progress on a transport (non-strict xfail until it lands)",
    ):
        config.addinivalue_line("markers", line)


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture(params=list(DRIVERS))
def driver_class(request: pytest.FixtureRequest) -> type[Any]:
    """The driver class of this run, once the test's markers have had their say (outside Trio, so a
    skip or an xfail is reported as such)."""
    return _apply_markers(request, DRIVERS[request.param])


@pytest.fixture
async def driver(request: pytest.FixtureRequest, driver_class: type[Any], probe: Probe) -> AsyncIterator[Any]:
    async with open_driver(driver_class.name, probe, _config(request)) as driver:
        yield driver


@pytest.fixture
def exchange_probe() -> ExchangeProbe:
    return ExchangeProbe()


@pytest.fixture(params=list(EXCHANGE_DRIVERS))
def exchange_driver_class(request: pytest.FixtureRequest) -> type[Any]:
    """``driver_class`` for the exchange contract."""
    return _apply_markers(request, EXCHANGE_DRIVERS[request.param])


@pytest.fixture
async def exchange_driver(
    request: pytest.FixtureRequest, exchange_driver_class: type[Any], exchange_probe: ExchangeProbe
) -> AsyncIterator[Any]:
    async with open_exchange_driver(exchange_driver_class.name, exchange_probe, _config(request)) as driver:
        yield driver


def _apply_markers(request: pytest.FixtureRequest, cls: type[Any]) -> type[Any]:
    for marker in request.node.iter_markers("needs"):
        if not all(getattr(cls, capability) for capability in marker.args):
            pytest.skip(f"{cls.name}: {marker.kwargs['reason']}")
    for name in ("deviates", "bug"):
        for marker in request.node.iter_markers(name):
            if cls.name in marker.kwargs:
                request.node.add_marker(pytest.mark.xfail(strict=True, reason=marker.kwargs[cls.name]))
    for marker in request.node.iter_markers("pending"):
        if cls.name in marker.kwargs:
            request.node.add_marker(pytest.mark.xfail(strict=False, reason=marker.kwargs[cls.name]))
    return cls


def _config(request: pytest.FixtureRequest) -> WorkerConfig:
    marker = request.node.get_closest_marker("worker_config")
    return WorkerConfig(**{**DEFAULT_CONFIG, **(marker.kwargs if marker else {})})
