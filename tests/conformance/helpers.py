"""Small helpers shared by the contract tests."""

from __future__ import annotations

from typing import Any

from .drivers import samples

# Every test is bounded by this: generous, so that only a hang (a bug) reaches it.
TEST_TIMEOUT = 15.0


def outcomes(driver: Any, endpoint: str) -> dict[str, float]:
    """``ingress_requests_total`` of ``endpoint`` on the driver's transport, by outcome (non-zero only)."""
    found = samples(driver.handle, "ingress_requests_total", driver.transport, "endpoint", "outcome")
    return {outcome: value for (name, outcome), value in found.items() if name == endpoint}


def total(driver: Any, metric: str, endpoint: str) -> float:
    """The sum of ``metric`` over every other label, for ``endpoint`` on the driver's transport."""
    return samples(driver.handle, metric, driver.transport, "endpoint").get((endpoint,), 0.0)


def chunks(count: int, start: int = 0) -> list[dict[str, int]]:
    """What ``tokens`` yields: ``{"i": i}`` for each i."""
    return [{"i": i} for i in range(start, start + count)]


def rejections(driver: Any, endpoint: str, reason: str) -> float:
    """``ingress_rejections_total`` of ``endpoint`` on the driver's transport for ``reason``."""
    found = samples(driver.handle, "ingress_rejections_total", driver.transport, "endpoint", "reason")
    return found.get((endpoint, reason), 0.0)
