"""SIGTERM, SIGINT and SIGHUP start the shutdown; the next one skips the drain (coordinator.request
twice). SIGHUP is a closed terminal or a supervisor's stop: Python's default would kill the process at
once, cutting every stream, so it drains like the others (docs/operations.md has the signal table)."""

from __future__ import annotations

import signal

import trio

from ._shutdown import ShutdownCoordinator

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


async def watch_signals(
    coordinator: ShutdownCoordinator, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Forward shutdown signals to ``coordinator`` until cancelled (phase 3 cancels it)."""
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
        task_status.started()
        async for signum in signals:
            coordinator.request(f"signal {signal.Signals(signum).name}")
