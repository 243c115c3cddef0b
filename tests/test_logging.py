"""Logging: one stream in one format, library lines included; per-request context in handler lines."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import warnings
from pathlib import Path

import pytest
import structlog
import trio
from structlog.testing import capture_logs

from runtime import EXIT_OK, RequestContext, Worker, configure_logging, dispatch
from runtime._ops_server import ops_config
from runtime.testing import RecordingSink, bind_for_test, nats_server, worker_process
from transports.http import HttpTransport
from transports.nats import NatsClient
from transports.tcp import TcpClient

HERE = Path(__file__).parent


@pytest.fixture
def restore_logging():
    """configure_logging changes process-wide state: put structlog and the root logger back after."""
    saved = structlog.get_config()
    root = logging.getLogger()
    level = root.level
    yield
    structlog.configure(**saved)
    # Only its own handler: pytest adds and removes its capture handlers around each test phase.
    for handler in [h for h in root.handlers if type(h).__module__ == "runtime._logging"]:
        root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.fixture
def app_on_path(monkeypatch):
    """Lets a worker process import tests/logging_app.py as ``logging_app``."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))


def _lines(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_library_line_after_configure_logging_json_is_one_json_object(restore_logging):
    """A stdlib record from nats-py's logger comes out as one JSON line with logger, level and traceback."""
    out = io.StringIO()
    configure_logging("json", "info", out)
    try:
        raise ConnectionResetError("peer reset")
    except ConnectionResetError as exc:
        logging.getLogger("nats.aio.client").error("nats: encountered error", exc_info=exc)
    (line,) = _lines(out)
    assert line["logger"] == "nats.aio.client" and line["level"] == "error"
    assert line["event"] == "nats: encountered error" and "timestamp" in line
    assert line["exception"][0]["exc_type"] == "ConnectionResetError"


def test_a_python_warning_after_configure_logging_is_a_json_line(restore_logging):
    """warnings.warn (printed raw to stderr by default) comes out as a JSON line from ``py.warnings``."""
    out = io.StringIO()
    configure_logging("json", "info", out)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("old API", DeprecationWarning, stacklevel=1)
    (line,) = _lines(out)
    assert line["logger"] == "py.warnings" and line["level"] == "warning" and "old API" in line["event"]


def test_log_level_applies_to_library_loggers(restore_logging):
    """--log-level warning hides a library's info line; at info it is written (as JSON)."""
    quiet, loud = io.StringIO(), io.StringIO()
    configure_logging("json", "warning", quiet)
    logging.getLogger("hypercorn.error").info("Running on http://127.0.0.1:8000")
    chatty = logging.getLogger("trio_asyncio.chatty")
    chatty.setLevel(logging.DEBUG)  # a library that turns its own logger up does not get past the level
    chatty.info("turned up")
    chatty.setLevel(logging.NOTSET)
    logging.getLogger("trio_asyncio").warning("kept")
    assert [line["event"] for line in _lines(quiet)] == ["kept"]
    configure_logging("json", "info", loud)
    logging.getLogger("hypercorn.error").info("Running on http://127.0.0.1:8000")
    assert [(line["logger"], line["level"]) for line in _lines(loud)] == [("hypercorn.error", "info")]


def test_hypercorn_error_logger_has_no_handler_of_its_own():
    """The HTTP and ops servers hand hypercorn a Logger, so it adds no plain-text stderr handler and its
    lines reach the root handler configure_logging installs."""
    hypercorn_error = logging.getLogger("hypercorn.error")
    before, hypercorn_error.handlers = hypercorn_error.handlers, []  # whatever another test's Config left
    try:
        for config in (HttpTransport().hypercorn_config(), ops_config()):
            assert config.log.error_logger is hypercorn_error
            assert hypercorn_error.handlers == [] and hypercorn_error.propagate
    finally:
        hypercorn_error.handlers = before


def test_console_format_to_a_file_has_no_colour_escapes(restore_logging):
    """--log-format console on a non-TTY stream writes no ANSI escapes, for runtime and library lines."""
    out = io.StringIO()
    configure_logging("console", "info", out)
    structlog.get_logger("ingress").info("worker.ready", addresses={"tcp": "127.0.0.1:1"})
    logging.getLogger("asyncio").warning("library warning")
    text = out.getvalue()
    assert "worker.ready" in text and "library warning" in text
    assert "\x1b[" not in text


def _context_worker(seen: dict[str, trio.Event]) -> Worker:
    worker = Worker("ctxw")

    @worker.endpoint("talk")
    async def talk(request, ctx: RequestContext):
        structlog.get_logger().info("handler.before", mine=ctx.id)
        seen[ctx.id].set()
        await seen[request["wait_for"]].wait()  # both requests are inside their handlers at once
        structlog.get_logger().info("handler.after", mine=ctx.id)
        return "ok"

    return worker


async def test_handler_log_lines_carry_their_own_request_context():
    """A handler's structlog lines carry worker, request_id, endpoint and transport; two concurrent
    requests never see each other's id, and nothing is left bound after the request."""
    seen = {"a": trio.Event(), "b": trio.Event()}
    bound = bind_for_test(_context_worker(seen))
    # capture_logs drops the configured chain: merge_contextvars is put back, as configure_logging has it.
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with trio.open_nursery() as nursery:
            for rid, other in (("a", "b"), ("b", "a")):
                ctx, request = bound.context("talk", request_id=rid), {"wait_for": other}
                nursery.start_soon(dispatch, bound.endpoint("talk"), ctx, request, RecordingSink())
        # A third request run in this very task (as a transport's reader task could): reset when it ends.
        seen["c"] = trio.Event()
        inline = bound.context("talk", request_id="c")
        await dispatch(bound.endpoint("talk"), inline, {"wait_for": "c"}, RecordingSink())
        structlog.get_logger().info("after.requests")
    handler_lines = [line for line in logs if line["event"].startswith("handler.")]
    assert len(handler_lines) == 6
    for line in handler_lines:
        assert line["request_id"] == line["mine"]
        assert (line["worker"], line["endpoint"], line["transport"]) == ("ctxw", "talk", "test")
    assert "request_id" not in logs[-1] and logs[-1]["event"] == "after.requests"


async def test_a_worker_process_writes_only_json_lines_with_library_lines_and_request_context(app_on_path):
    """A real worker with --log-format json (HTTP, TCP and NATS against a real nats-server) writes no
    non-JSON line across start, requests that log through structlog and stdlib, and a SIGTERM."""
    import httpx

    async with (
        nats_server() as url,
        worker_process(
            "logging_app:worker", "--nats", url, "--http", "127.0.0.1:0", "--tcp", "127.0.0.1:0"
        ) as worker,
    ):
        host, port = worker.addresses["http"]
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as http:
            response = await http.post("/v1/chatty", json={"value": 1}, headers={"x-request-id": "rid-http"})
            assert response.status_code == 200
        async with TcpClient.connect(*worker.addresses["tcp"]) as tcp:
            assert await tcp.call("chatty", {"value": 2}) == {"ok": True}
        async with NatsClient.connect(url) as nats:
            assert await nats.call("chatty", {"value": 3}) == {"ok": True}
        worker.send_signal(signal.SIGTERM)
        assert await worker.wait_exit() == EXIT_OK
        await worker.wait_event("worker.stopped")
    assert [e for e in worker.events if e["event"] == "unparsed"] == []
    said = [e for e in worker.events if e["event"] == "handler.said"]
    assert sorted(e["transport"] for e in said) == ["http", "nats", "tcp"]
    assert all(e["endpoint"] == "chatty" and e["worker"] == "logs" and e["request_id"] for e in said)
    assert [e["request_id"] for e in said if e["transport"] == "http"] == ["rid-http"]
    library = [e for e in worker.events if e.get("logger") == "nats.aio.client"]
    assert len(library) == 3 and all(e["exception"][0]["exc_type"] == "ConnectionResetError" for e in library)
    assert len([e for e in worker.events if e.get("logger") == "trio_asyncio"]) == 3


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_tracebacks_never_carry_local_variables(restore_logging, fmt):
    """A traceback in the log shows where, never the frames' locals: a request's credential or payload
    held in a local (a user's auth check, say) must not reach the log."""
    out = io.StringIO()
    configure_logging(fmt, "info", out)

    def check(token: str) -> None:
        expected = "not-" + token
        raise ValueError(f"bad length {len(token)} (want {len(expected)})")

    secret = "-".join(("tok", "5f0c2a91b7"))  # not in any source line a traceback may quote
    try:
        check(secret)
    except ValueError:
        structlog.get_logger().exception("auth.check_failed")
        logging.getLogger("hypercorn.error").exception("Error in ASGI Framework")
    text = out.getvalue()
    assert "auth.check_failed" in text and "ValueError" in text and "bad length" in text
    assert secret not in text
