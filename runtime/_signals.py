"""SIGTERM, SIGINT and SIGHUP start the shutdown; the next one skips the drain (coordinator.request
twice). SIGHUP is a closed terminal or a supervisor's stop: Python's default would kill the process at
once, cutting every stream, so it drains like the others (docs/operations.md has the signal table).
SIGUSR1 re-reads the token file (docs/security.md "Rotation"); it is not a shutdown signal."""

from __future__ import annotations

import signal
from typing import Any

import trio

from ._context import RuntimeContext
from ._shutdown import ShutdownCoordinator

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
RELOAD_SIGNAL = signal.SIGUSR1


async def watch_signals(
    coordinator: ShutdownCoordinator,
    runtime: RuntimeContext,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Forward shutdown signals to ``coordinator``, and reload the credentials on SIGUSR1, until
    cancelled (phase 3 cancels it)."""
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS, RELOAD_SIGNAL) as signals:
        task_status.started()
        async for signum in signals:
            if signum == RELOAD_SIGNAL:
                reload_credentials(runtime.config.authenticator, runtime.logger)
            else:
                coordinator.request(f"signal {signal.Signals(signum).name}")


def reload_credentials(authenticator: Any, log: Any) -> None:
    """Re-read the authenticator's credentials if it can (a ``TokenFile``); a file that fails to parse
    leaves the ones in force and says which line (never a token)."""
    reload = getattr(authenticator, "reload", None)
    if reload is None:
        log.warning("auth.reload_ignored", reason="this worker has no token file to reload")
        return
    try:
        count = reload()
    except ValueError as exc:
        log.error("auth.reload_failed", error=str(exc), kept="the credentials in force")
        return
    log.info("auth.reloaded", tokens=count)
