"""Accept loops: out of descriptors is a rate-limited warning and a retry, and the backlog is a setting."""

from __future__ import annotations

import errno
import shutil

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from runtime import DEFAULT_BACKLOG, open_listeners, serve_accepting
from runtime._errors import sole_exception
from runtime._listeners import CAPACITY_RETRY_DELAY, CAPACITY_WARNING_INTERVAL


class _StarvedListener:
    """Fails accept() with ``error`` until ``until`` (Trio time), then hands out one stream and waits."""

    def __init__(self, error: int, until: float) -> None:
        self.error = error
        self.until = until
        self.attempts = 0

    async def accept(self) -> trio.testing.MemorySendStream:
        await trio.lowlevel.checkpoint()
        self.attempts += 1
        if trio.current_time() < self.until:
            raise OSError(self.error, "simulated")
        self.until = float("inf")  # one stream, then nothing more to accept
        return trio.testing.MemorySendStream()


async def test_running_out_of_descriptors_warns_once_per_interval_and_keeps_accepting(autojump_clock):
    """EMFILE for 25 s is three warnings with failure counts, not a traceback per attempt; then it serves."""
    listener = _StarvedListener(errno.EMFILE, until=25.0)
    served = trio.Event()

    async def handler(stream: object) -> None:
        served.set()

    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: serve_accepting(
                    handler,
                    [listener],  # type: ignore[list-item]  # duck-typed like a SocketListener
                    handler_nursery=nursery,
                    logger=_structlog(),
                    listener_name="tcp",
                )
            )
            await served.wait()
            nursery.cancel_scope.cancel()
    warnings = [e for e in logs if e["event"] == "listener.accept_failing"]
    assert len(warnings) == 25 // CAPACITY_WARNING_INTERVAL + 1  # at 0 s, 10 s and 20 s
    assert warnings[0]["failures"] == 1
    # Every failure is reported exactly once, the last ones in no warning yet (the interval had not passed).
    assert sum(w["failures"] for w in warnings) <= listener.attempts - 1
    assert (
        listener.attempts - 1 - sum(w["failures"] for w in warnings)
        < CAPACITY_WARNING_INTERVAL / CAPACITY_RETRY_DELAY
    )
    assert all(w["error"] == "EMFILE" and w["listener"] == "tcp" for w in warnings)
    assert listener.attempts == pytest.approx(25 / CAPACITY_RETRY_DELAY + 1, abs=2)


async def test_an_accept_error_that_is_not_about_capacity_still_propagates(autojump_clock):
    """A broken listener (EBADF) is not mistaken for a busy one: the error reaches the caller."""
    listener = _StarvedListener(errno.EBADF, until=float("inf"))
    with pytest.raises(BaseExceptionGroup) as caught:
        async with trio.open_nursery() as nursery:
            await serve_accepting(
                _never,
                [listener],  # type: ignore[list-item]
                handler_nursery=nursery,
                logger=_structlog(),
                listener_name="tcp",
            )
    error = sole_exception(caught.value)
    assert isinstance(error, OSError) and error.errno == errno.EBADF


async def _never(stream: object) -> None:
    raise AssertionError("nothing should be accepted")


def _structlog():
    import structlog

    return structlog.get_logger("test")


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read the listen queue")
@pytest.mark.parametrize("backlog", [DEFAULT_BACKLOG, 37])
async def test_the_backlog_setting_reaches_the_kernel(backlog):
    """The listen queue the kernel reports for the socket is the configured backlog (default 4096)."""
    listeners = await open_listeners("127.0.0.1", 0, backlog)
    port = listeners[0].socket.getsockname()[1]
    try:
        ss = await trio.run_process(["ss", "-ltnH", f"sport = :{port}"], capture_stdout=True)
    finally:
        for listener in listeners:
            await listener.aclose()
    somaxconn = int(await trio.Path("/proc/sys/net/core/somaxconn").read_text())
    assert int(ss.stdout.split()[2]) == min(backlog, somaxconn)  # ss shows a listener's queue as Send-Q
