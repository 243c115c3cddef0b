"""structlog set-up, done once by the entry point (the CLI; an embedding program calls
``configure_logging`` itself), never on import.

JSON lines when the output is not a terminal (what log shippers want), a console renderer on a TTY;
colours only on a TTY, so a console log redirected to a file carries no ANSI escapes.
Levels below the configured one cost a no-op method call, which matters for the per-request line.

Libraries (hypercorn, nats-py, trio-asyncio, asyncio) log through stdlib ``logging``. One root handler
renders their records with the same processors and renderer, at the same level, so the process writes a
single stream: each library line is one JSON object (with its ``logger`` name) in JSON mode. The runtime's
own lines never go through stdlib ``logging``: the per-request line stays on structlog's short path.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
import structlog.tracebacks

LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")


class _LibraryHandler(logging.Handler):
    """The root handler ``configure_logging`` installs. It writes through a structlog ``WriteLogger`` on
    the same stream, which shares structlog's lock for that stream: a library line from another thread
    can never land in the middle of one of the runtime's lines."""

    def __init__(self, out: TextIO) -> None:
        super().__init__()
        self.writer = structlog.WriteLogger(out)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.writer.msg(self.format(record))
        except Exception:
            self.handleError(record)  # stdlib's contract: a broken log line must not raise into the caller


# structlog's dict_tracebacks, without the frames' locals (see configure_logging).
_DICT_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


def configure_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog, and stdlib ``logging`` through it, for the process: ``fmt`` is auto, json or
    console; ``level`` a level name, applied to the runtime's lines and to every library's alike."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    out = stream or sys.stdout
    tty = out.isatty()
    if fmt == "auto":
        fmt = "console" if tty else "json"
    # Tracebacks never carry the frames' local variables: a request's credential (docs/security.md),
    # its payload or a user check's token would be printed with them (structlog shows them by default).
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=tty, exception_formatter=structlog.dev.plain_traceback)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # The console renderer prints exc_info itself; JSON needs it as data.
    final: list[Any] = [_DICT_TRACEBACKS, renderer] if fmt == "json" else [renderer]
    threshold = getattr(logging, level.upper())
    structlog.configure(
        processors=[*shared, *final],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        # One write per line (message and newline together), cheaper than print() on the per-request path.
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
    _route_stdlib(out, threshold, [structlog.stdlib.add_logger_name, *shared], final)


def _route_stdlib(out: TextIO, threshold: int, pre_chain: list[Any], final: list[Any]) -> None:
    """Send every stdlib logger's records through structlog's processors to ``out``, at ``threshold``."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=pre_chain,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = _LibraryHandler(out)
    handler.setFormatter(formatter)
    handler.setLevel(threshold)  # also for a library that sets its own logger's level below ours
    root = logging.getLogger()
    # Replaces whatever was there (as ``logging.basicConfig(force=True)`` would): a second handler would
    # print each library line twice, once in a format that breaks the stream.
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)
    # warnings.warn() would otherwise print raw text to stderr; as records they come out as lines too.
    logging.captureWarnings(True)


def get_logger(**initial: Any) -> Any:
    """The runtime's logger; structlog resolves the configuration lazily, on first use."""
    return structlog.get_logger("ingress", **initial)
