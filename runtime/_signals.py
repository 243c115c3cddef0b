"""SIGTERM and SIGINT start the shutdown; the next one skips the drain (coordinator.request twice)."""

from __future__ import annotations

import signal

import trio

from ._shutdown import ShutdownCoordinator

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def watch_signals(
    coordinator: ShutdownCoordinator, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Forward shutdown signals to ``coordinator`` until cancelled (phase 3 cancels it)."""
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
        task_status.started()
        async for signum in signals:
            coordinator.request(f"signal {signal.Signals(signum).name}")
