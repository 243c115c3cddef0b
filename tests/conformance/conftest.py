"""The ``driver`` fixture: the conformance worker served on one transport, once per transport.

Markers a contract test may carry:

- ``@pytest.mark.worker_config(drain_timeout=...)``: ``WorkerConfig`` fields for this test's worker
  (over ``DEFAULT_CONFIG``);
- ``@pytest.mark.needs("capability", reason=...)``: skip the drivers whose class lacks it (say, a timeout
  that can be malformed);
- ``@pytest.mark.deviates(nats="why")``: a documented difference of that transport from the contract;
  the test is a strict xfail there, so it fails the day the difference goes away.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from runtime import WorkerConfig

from .app import Probe
from .drivers import DRIVERS, open_driver

# A drain that nothing in a test holds up ends at once; one that something does is cut in 5 s.
DEFAULT_CONFIG: dict[str, Any] = {"drain_timeout": 5.0, "kill_grace": 1.0}


def pytest_configure(config: pytest.Config) -> None:
    for line in (
        "worker_config(**fields): WorkerConfig fields for this test's conformance worker",
        "needs(*capabilities, reason): run only on drivers that have these capabilities",
        "deviates(**reasons): a transport's documented deviation from this contract (strict xfail)",
    ):
        config.addinivalue_line("markers", line)


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture(params=list(DRIVERS))
def driver_class(request: pytest.FixtureRequest) -> type[Any]:
    """The driver class of this run, once the test's markers have had their say (outside Trio, so a
    skip or an xfail is reported as such)."""
    cls = DRIVERS[request.param]
    for marker in request.node.iter_markers("needs"):
        if not all(getattr(cls, capability) for capability in marker.args):
            pytest.skip(f"{cls.name}: {marker.kwargs['reason']}")
    for marker in request.node.iter_markers("deviates"):
        if cls.name in marker.kwargs:
            request.node.add_marker(pytest.mark.xfail(strict=True, reason=marker.kwargs[cls.name]))
    return cls


@pytest.fixture
async def driver(request: pytest.FixtureRequest, driver_class: type[Any], probe: Probe) -> AsyncIterator[Any]:
    marker = request.node.get_closest_marker("worker_config")
    config = WorkerConfig(**{**DEFAULT_CONFIG, **(marker.kwargs if marker else {})})
    async with open_driver(driver_class.name, probe, config) as driver:
        yield driver
