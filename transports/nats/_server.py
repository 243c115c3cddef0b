"""The NATS ingress: one queue subscription per endpoint, replies streamed to the caller's inbox.

The transport runs on the worker's asyncio loop when it has one (``Worker(asyncio=True)``), else on a
trio-asyncio loop of its own, opened in ``serve``, so that no asyncio task of it outlives the transport.
Each endpoint's intake (its subscription loop) runs inside that endpoint's scope;
phase 1 cancels it, drains the subscription (NATS routes new requests to other workers of the queue
group) and answers anything already delivered but not started with a retryable UNAVAILABLE. Replies from
every request go through one outbox to an asyncio publisher task, with no crossing per message.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
from nats.aio.msg import Msg

from runtime import (
    Call,
    Caller,
    EndpointBinding,
    IngressError,
    InternalError,
    TransportBinding,
    Unavailable,
    describe,
    refuse,
)

from . import _aio as aio
from . import _protocol as protocol
from ._exchange import ExchangeInput, ExchangeInputs
from ._services import Service, ServiceEndpoint

# Messages delivered to one endpoint and not yet started; past this the asyncio side refuses them.
INBOX_SIZE = 1024
# Reply bytes queued for publishing before handlers feel back-pressure (bounded in bytes, as the other
# transports' writers are: one max-size chunk still passes, a flood of them waits).
OUTBOX_HIGH_WATER = 1024 * 1024
# Bound on the final drain of the connection in phase 3.
CLOSE_TIMEOUT = 5.0
# $SRV and status requests waiting to be answered; more at once are dropped (their askers time out).
QUERY_BACKLOG = 64
# Waits between connection attempts at start-up, doubling from the first to the last.
FIRST_CONNECT_BACKOFF = 0.1
MAX_CONNECT_BACKOFF = 2.0


@dataclass(frozen=True, slots=True)
class NatsTransport:
    """Serve a worker's endpoints on a NATS server, in queue groups shared with other workers."""

    url: str = "nats://127.0.0.1:4222"
    namespace: str = "ingress"
    # How often a running request checks that its caller still listens; a caller that has gone away
    # is noticed within this long (plus one probe round trip).
    caller_check_interval: float = 2.0
    # Passed to nats.connect as they are: token, user/password, user_credentials, tls, ...
    connect_options: Mapping[str, Any] = field(default_factory=dict)
    # At start-up, how long to keep trying a server that cannot be reached before the worker gives up
    # (exit 1, for its supervisor to restart it). A server that refuses us (credentials, TLS) fails the
    # start-up at once. Once connected, a lost connection is re-established for as long as it takes.
    startup_timeout: float = 30.0
    # How often the worker publishes its load report (its /status object, docs/protocol-nats.md "Load
    # reports") on _INGRESS.load.<namespace>.<worker id>, from start-up to phase 3; None: never.
    load_report_interval: float | None = 5.0
    name: str = "nats"

    def __post_init__(self) -> None:
        protocol.check_url(self.url)

    async def serve(
        self, binding: TransportBinding, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        log = binding.runtime.logger

        closing = False

        def on_connected(connected: bool) -> None:
            if closing:
                return  # our own close in phase 3, not an outage
            # Not ready while NATS is unreachable: requests cannot reach this worker anyway.
            binding.readiness.report(self.name, connected, f"disconnected from {self.url}")
            log.warning("nats.reconnected" if connected else "nats.disconnected", url=self.url)

        def on_error(exc: Exception) -> None:
            log.warning("nats.error", url=self.url, error=describe(exc))

        async with aio.open_loop():
            client = await self._connect(log, on_connected, on_error)
            outbox = _Outbox(client, log)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(outbox.publisher.run)
                    worker_id = uuid.uuid4().hex
                    if binding.status is not None:
                        status = partial(_identified, binding.status, worker_id)
                        subjects = protocol.status_subjects(self.namespace, worker_id)
                        await nursery.start(_answer_requests, subjects, lambda _: status(), client, outbox)
                        if self.load_report_interval is not None:
                            nursery.start_soon(self._report_load, status, outbox, worker_id)
                    control = protocol.control_subject(worker_id)
                    inputs = ExchangeInputs(worker_id, control, outbox.publisher.put_nowait)
                    requests = _Requests(self, client, Caller(binding), outbox, nursery, control, inputs)
                    nursery.start_soon(requests.watch_callers)
                    # Taken in the subscription callback: neither may be dropped while Trio is behind.
                    await aio.subscribe_handled(client, control, requests.control_message)
                    await aio.subscribe_handled(client, inputs.subscription_subject, inputs.receive)
                    binding.defer_open()
                    task_status.started(self.url)
                    # NATS gives requests to whoever subscribes: until the engine is up this worker
                    # stays out of its queue groups, and the other workers take them.
                    await binding.started.wait()
                    for endpoint in binding.endpoints.values():
                        await nursery.start(requests.serve_endpoint, endpoint)
                    service = Service.create(
                        binding.runtime.worker_name,
                        worker_id,
                        [
                            ServiceEndpoint(name, protocol.subject(self.namespace, name))
                            for name in binding.endpoints
                        ],
                        binding.runtime.metrics.registry,
                        self.name,
                    )
                    await nursery.start(_answer_requests, service.subjects(), service.reply, client, outbox)
                    binding.runtime.logger.info("nats.subscribed", url=self.url, namespace=self.namespace)
                    binding.opened()
            finally:
                # Phase 3: the last replies may still be queued (their requests are done and counted
                # out), so they are published before the connection is flushed and closed.
                closing = True
                with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                    await outbox.publisher.close()

    async def _report_load(
        self, status: Callable[[], dict[str, Any]], outbox: _Outbox, worker_id: str
    ) -> None:
        """Publish the worker's status every ``load_report_interval`` until cancelled."""
        assert self.load_report_interval is not None
        subject = protocol.load_subject(self.namespace, worker_id)
        while True:
            report = json.dumps(status(), separators=(",", ":")).encode()
            outbox.publisher.put_nowait(aio.Outgoing(subject, report, {}))
            await trio.sleep(self.load_report_interval)

    async def _connect(
        self, log: Any, on_connected: Callable[[bool], None], on_error: Callable[[Exception], None]
    ) -> Any:
        """Connect, trying again with backoff while the server cannot be reached (see startup_timeout)."""
        give_up_at = trio.current_time() + self.startup_timeout
        backoff = FIRST_CONNECT_BACKOFF
        attempt = 0
        while True:
            attempt += 1
            try:
                return await aio.connect(self.url, on_connected, self.connect_options, on_error)
            except aio.ConnectFailed as exc:
                if exc.refused:
                    raise Unavailable(f"{self.url} refused the connection: {exc}", retryable=False) from exc
                if trio.current_time() + backoff > give_up_at:
                    message = f"cannot reach {self.url} within {self.startup_timeout:g} s: {exc}"
                    raise Unavailable(message, retryable=True) from exc
                log.warning(
                    "nats.connect_failed", url=self.url, attempt=attempt, error=str(exc), retry_in=backoff
                )
            await trio.sleep(backoff)
            backoff = min(backoff * 2, MAX_CONNECT_BACKOFF)


def _identified(status: Callable[[], dict[str, Any]], worker_id: str) -> dict[str, Any]:
    """The worker's status with its NATS id (which a router uses to tell workers of one name apart)."""
    return {**status(), "worker_id": worker_id}


async def _answer_requests(
    subjects: Sequence[str],
    reply: Callable[[str], dict[str, Any]],
    client: Any,
    outbox: _Outbox,
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    """Answer requests on ``subjects`` with ``reply(subject)`` as JSON until phase 3: the services
    protocol (``$SRV.PING/INFO/STATS``, transports/nats/_services.py) and the status requests. A flood
    past the channel is dropped: the asker's request times out, nothing else waits."""
    send, receive = trio.open_memory_channel[Msg](QUERY_BACKLOG)

    def take(msg: Msg) -> None:
        with contextlib.suppress(trio.WouldBlock):
            send.send_nowait(msg)

    for subject in subjects:
        await aio.subscribe_handled(client, subject, take)
    task_status.started()
    async for msg in receive:
        if msg.reply:
            answer = json.dumps(reply(msg.subject), separators=(",", ":")).encode()
            outbox.publisher.put_nowait(aio.Outgoing(msg.reply, answer, {}))


@dataclass(frozen=True, slots=True)
class _Requests:
    """What every request of the transport shares: the connection, the outbox, the request nursery."""

    transport: NatsTransport
    client: Any
    # Every running request by its caller's reply inbox (unique per request): for STOP/KILL messages
    # and for the one task that checks that callers are alive.
    caller: Caller
    outbox: _Outbox
    nursery: trio.Nursery
    control: str
    # Exchanges whose callers stream their input, on subjects of this worker's own.
    inputs: ExchangeInputs
    # The sink of every running request, by its caller's reply inbox: probes tell how far it got.
    sinks: dict[str, _NatsSink] = field(default_factory=dict)

    async def serve_endpoint(
        self, endpoint: EndpointBinding, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        send, receive = trio.open_memory_channel[Msg](INBOX_SIZE)
        subject = protocol.subject(self.transport.namespace, endpoint.name)
        subscription = await aio.subscribe(self.client, subject, subject, send)
        task_status.started()
        with endpoint.scope:  # the endpoint scope: cancelled in phase 1
            async for msg in receive:
                self.start_soon(endpoint, msg)
                # Start everything else already delivered in this same turn: a checkpoint per message
                # would cost a whole scheduler pass (an epoll) per request under load.
                while True:
                    try:
                        msg = receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    self.start_soon(endpoint, msg)
        # Phase 1: no new deliveries; what was delivered but not started goes back to the caller.
        # Phase 3 may begin meanwhile (phase 1 waits for requests, not for this): shielded, so that
        # neither the drain's round trip nor those answers are cut off halfway, and bounded.
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await aio.drain_subscription(self.client, subscription)
            send.close()
            async for msg in receive:
                refusal = self.start(endpoint, msg)  # refused (and counted) by the core: intake is closed
                if refusal is not None:
                    await refuse(*refusal)

    def start_soon(self, endpoint: EndpointBinding, msg: Msg) -> None:
        refusal = self.start(endpoint, msg)
        if refusal is not None:
            self.nursery.start_soon(refuse, *refusal)

    def start(self, endpoint: EndpointBinding, msg: Msg) -> tuple[_NatsSink, IngressError] | None:
        """Open the request and spawn it; a refusal comes back, for the caller's loop to answer."""
        if not msg.reply:
            return None  # a publish with nowhere to answer: nothing can be delivered, so nothing is run
        headers = msg.headers or {}
        prefix = protocol.METADATA_PREFIX
        sink = _NatsSink(self.outbox, msg.reply, self.control)
        try:
            call = self.caller.open(
                msg.reply,
                endpoint.name,
                request_id=headers.get(protocol.REQUEST_ID),
                metadata={k[len(prefix) :]: v for k, v in headers.items() if k.startswith(prefix)},
                peer=msg.reply,
            )
        except IngressError as error:
            return sink, error
        exchange_input = None
        if call.inbox is not None and headers.get(protocol.INPUT) == protocol.STREAM_INPUT:
            exchange_input = self.inputs.open(call, msg.reply, msg.data)
        self.sinks[msg.reply] = sink
        self.nursery.start_soon(self.run, call, msg, sink, exchange_input)
        return None

    async def run(self, call: Call, msg: Msg, sink: _NatsSink, exchange_input: ExchangeInput | None) -> None:
        headers = msg.headers or {}
        try:
            await call.run(
                b"" if exchange_input is not None else msg.data,
                sink,
                timeout_ms=headers.get(protocol.TIMEOUT_MS),
                deadline_unix=headers.get(protocol.DEADLINE),
                timeout_name=protocol.TIMEOUT_MS,
                streamed_input=exchange_input is not None,
            )
        finally:
            if self.sinks.get(msg.reply) is sink:
                del self.sinks[msg.reply]
            if exchange_input is not None:
                self.inputs.close(exchange_input)

    def control_message(self, msg: Msg) -> None:
        """STOP and KILL from callers, for the requests this worker is running, honoured at once. A
        request that is not running finished already: its end crossed the control message."""
        headers = msg.headers or {}
        target = headers.get(protocol.TARGET, "")
        if headers.get(protocol.KIND) == protocol.KILL:
            self.caller.kill(target)
        else:
            self.caller.stop(target)

    def probe_headers(self, reply: str) -> dict[str, str]:
        headers = self.inputs.probe_headers(reply)
        sink = self.sinks.get(reply)
        if sink is not None:
            headers[protocol.SENT] = str(sink.seq)  # the caller can tell a loss at the tail
        return headers

    async def watch_callers(self) -> None:
        """Every interval, probe the inbox of every request that has run at least that long, all in one
        crossing, and kill the handlers whose caller is gone (nobody subscribed to its inbox)."""
        interval = self.transport.caller_check_interval
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            checked = [call for call in self.caller.calls() if now - call.ctx.accepted_at >= interval]
            if not checked:
                continue
            probes = [(str(call.key), self.probe_headers(str(call.key))) for call in checked]
            answers = await aio.probe_all(self.client, probes, interval)
            for call, answer in zip(checked, answers, strict=True):
                if answer is None:
                    if not call.ctx.is_killed:
                        self.caller.drop(call.key, "gone")
                else:
                    self.inputs.probed(str(call.key), answer)


class _NatsSink:
    """One request's replies: numbered data messages, then end (with the count) or error."""

    __slots__ = ("control", "outbox", "reply", "seq")

    def __init__(self, outbox: _Outbox, reply: str, control: str) -> None:
        self.outbox = outbox
        self.reply = reply
        self.control = control
        self.seq = 0

    async def send_chunk(self, data: bytes) -> None:
        self._check_size(data)
        headers = protocol.data_headers(self.seq)
        if self.seq == 0:
            headers[protocol.CONTROL] = self.control  # where the caller can send STOP or KILL
        self.seq += 1
        await self.outbox.put(aio.Outgoing(self.reply, data, headers))

    async def send_result(self, data: bytes) -> None:
        # One message, not data + end: half the publishes, and a plain ``nc.request`` gets the answer.
        self._check_size(data)
        await self.outbox.put(aio.Outgoing(self.reply, data, protocol.result_headers(self._next())))

    async def send_end(self, chunks: int) -> None:
        await self.outbox.put(aio.Outgoing(self.reply, b"", protocol.end_headers(self._next(), chunks)))

    async def send_error(self, error: IngressError, retryable: bool) -> None:
        data, headers = protocol.error_message(self._next(), error, retryable)
        await self.outbox.put(aio.Outgoing(self.reply, data, headers))

    def _check_size(self, data: bytes) -> None:
        limit = self.outbox.max_payload
        if len(data) > limit:
            # NATS would refuse it; say so rather than let the caller see a gap.
            raise InternalError(
                f"a chunk of {len(data)} bytes exceeds the NATS server's max_payload ({limit})"
            )

    def _next(self) -> int:
        seq, self.seq = self.seq, self.seq + 1
        return seq


class _Outbox:
    """Every reply of the worker, handed to the asyncio publisher without a crossing; callers wait
    here (back-pressure) while the publisher is a whole high-water mark behind."""

    def __init__(self, client: Any, log: Any) -> None:
        # Headers and framing take a little of the server's limit: keep room for them.
        self.max_payload = int(client.max_payload) - 1024
        self._space = trio.lowlevel.ParkingLot()
        self._log = log
        self.publisher = aio.Publisher(client, self._space.unpark_all, self._failed)

    async def put(self, message: aio.Outgoing) -> None:
        while self.publisher.queued_bytes >= OUTBOX_HIGH_WATER:
            await self._space.park()
        self.publisher.put_nowait(message)

    def _failed(self, count: int, exc: Exception) -> None:
        # An outage longer than nats-py's reconnect buffer: these replies are lost, which their callers
        # see as a gap or a missing end (explicit errors). The worker itself goes on.
        self._log.warning("nats.publish_failed", messages=count, error=repr(exc))
