"""NatsClient: the caller side of the NATS request plane, the same shape as TcpClient.

    async with NatsClient.connect(url, namespace="ingress") as client:
        async for chunk in client.stream("generate", {"max_tokens": 8}):
            ...
        result = await client.call("echo", {"x": 1})

Each request gets its own inbox. Replies are checked for order: a gap in ``Ingress-Seq``, or an end
whose count disagrees with the data received, raises an explicit error instead of returning a silently
truncated stream. No responders (no worker subscribed) is a retryable UNAVAILABLE.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from typing import Any

import trio
from nats.aio.msg import Msg

from runtime import (
    BadRequest,
    ErrorCode,
    ExchangeEnded,
    IngressError,
    RetryBudget,
    Unavailable,
    decode_error,
    new_request_id,
    remote_error,
    retry_before_first_chunk,
)
from runtime._auth import AUTHORIZATION

from . import _aio as aio
from . import _protocol as protocol

# Replies buffered per request before the asyncio side drops them (a gap the caller then reports).
STREAM_BUFFER = 4096
# Bound on unsubscribing an inbox and on closing the connection, which run shielded during cleanup.
CLEANUP_TIMEOUT = 5.0
# A stream that hears nothing from its worker for this long (no reply, no liveness probe) is reported
# as lost. Workers probe every caller_check_interval (2 s by default), so this leaves room for several.
DEFAULT_STALL_TIMEOUT = 10.0


class NatsClient:
    def __init__(
        self, client: Any, namespace: str, stall_timeout: float, budget: RetryBudget, token: str | None = None
    ) -> None:
        self._client = client
        # Every request's credential, if the client was given one (docs/security.md).
        self._credential = {} if token is None else {AUTHORIZATION: f"Bearer {token}"}
        self.namespace = namespace
        self.stall_timeout = stall_timeout
        self.retry_budget = budget
        # The streams running now, by request id: where ``stop`` sends its message.
        self._running: dict[str, _ReplyState] = {}

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        url: str,
        *,
        namespace: str = "ingress",
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        retry_budget: RetryBudget | None = None,
        connect_options: Mapping[str, Any] | None = None,
        token: str | None = None,
    ) -> AsyncIterator[NatsClient]:
        """Connect for the duration of the block (the block owns its trio-asyncio loop). A malformed
        ``url`` is ``ValueError`` at once. ``token``: the credential every request carries
        (``Meta-authorization: Bearer TOKEN``, docs/security.md)."""
        protocol.check_url(url)
        async with aio.open_loop():
            try:
                client = await aio.connect(url, None, connect_options)
            except aio.ConnectFailed as exc:
                if exc.refused:
                    message = f"{url} refused the connection: {exc} (check the credentials or TLS options)"
                    raise Unavailable(message, retryable=False) from exc
                raise Unavailable(f"cannot connect to {url}: {exc}", retryable=True) from exc
            try:
                yield cls(client, namespace, stall_timeout, retry_budget or RetryBudget(), token)
            finally:
                with trio.move_on_after(CLEANUP_TIMEOUT, shield=True):
                    await aio.close(client)

    async def stream(
        self,
        endpoint: str,
        request: Any = None,
        *,
        deadline: float | None = None,
        metadata: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> AsyncGenerator[Any, None]:
        """Yield the chunks of one request; the deadline defaults to the caller's cancel scope.

        A retryable error before the first chunk (draining worker, overload, no responders) is retried
        with backoff, while the client's retry budget allows (runtime/_retry.py: the same rule for
        every client); after a chunk, errors are raised as they come."""
        request_id = request_id or new_request_id()
        chunks = retry_before_first_chunk(
            lambda _: self._stream_once(endpoint, request, deadline, metadata, request_id), self.retry_budget
        )
        async with aclosing(chunks):
            async for chunk in chunks:
                yield chunk

    async def _stream_once(
        self,
        endpoint: str,
        request: Any,
        deadline: float | None,
        metadata: Mapping[str, str] | None,
        request_id: str,
    ) -> AsyncGenerator[Any, None]:
        send, receive = trio.open_memory_channel[Msg](STREAM_BUFFER)
        inbox, subscription = await aio.subscribe_inbox(self._client, send)
        state = _ReplyState(inbox)
        self._running[request_id] = state
        try:
            headers = self._request_headers(request_id, deadline, metadata)
            await self._publish_request(endpoint, json.dumps(request).encode(), headers, inbox)
            replies = _replies(receive, self.stall_timeout, state)
            async with aclosing(replies):
                async for chunk in replies:
                    yield chunk
        finally:
            await self._finish(request_id, state, subscription)

    async def status(self, worker_id: str | None = None, *, patience: float = 2.0) -> dict[str, Any]:
        """A worker's live state (its /status object and ``worker_id``, docs/protocol-nats.md "Status"):
        the first worker of the namespace to answer, or the one with ``worker_id``. No answer within
        ``patience`` seconds raises ``Unavailable``."""
        everyone, _ = protocol.status_subjects(self.namespace, "")
        subject = everyone if worker_id is None else protocol.status_subjects(self.namespace, worker_id)[1]
        answer = await aio.request(self._client, subject, patience)
        if answer is None:
            who = f"worker {worker_id}" if worker_id else f"any worker of namespace {self.namespace!r}"
            raise Unavailable(f"no answer on {subject} within {patience:g} s: is {who} up?", retryable=True)
        try:
            report = json.loads(answer)
        except (ValueError, RecursionError):
            report = None
        if not isinstance(report, dict):
            raise Unavailable(
                f"the answer on {subject} is not a status object: {answer[:80]!r}", retryable=False
            )
        return report

    def exchange(
        self,
        endpoint: str,
        *,
        deadline: float | None = None,
        metadata: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> NatsExchange:
        """A full-duplex exchange with a duplex endpoint: ``await send(message)``, ``await end()``
        (half-close), and iterate the answers, all at once, from different tasks if you like. Use it as
        an ``async with`` block: leaving early kills the exchange. Not retried: an error before the
        first answer says whether trying again is safe."""
        return NatsExchange(self, endpoint, deadline, metadata, request_id or new_request_id())

    def _request_headers(
        self, request_id: str, deadline: float | None, metadata: Mapping[str, str] | None
    ) -> dict[str, str]:
        """A request's headers: its id, its deadline (relative and absolute) and its metadata."""
        headers = {protocol.REQUEST_ID: request_id}
        effective = deadline if deadline is not None else trio.current_effective_deadline()
        if not math.isinf(effective):
            remaining = effective - trio.current_time()
            headers[protocol.TIMEOUT_MS] = str(max(1, math.ceil(remaining * 1000)))
            headers[protocol.DEADLINE] = f"{time.time() + remaining:.3f}"
        merged = {**self._credential, **(metadata or {})}
        headers.update({protocol.METADATA_PREFIX + k: v for k, v in merged.items()})
        return headers

    async def _publish_request(self, endpoint: str, data: bytes, headers: dict[str, str], inbox: str) -> None:
        subject = protocol.subject(self.namespace, endpoint)
        await aio.publish_batch(self._client, [aio.Outgoing(subject, data, headers, reply=inbox)])

    async def _publish(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        await aio.publish_batch(self._client, [aio.Outgoing(subject, data, headers)])

    async def _finish(self, request_id: str, state: _ReplyState, subscription: Any) -> None:
        """A request is over for this caller: forget it, tell the worker if it was left before its end,
        and drop its inbox."""
        if self._running.get(request_id) is state:
            del self._running[request_id]
        state.control_known.set()  # a stop() still waiting learns that the request is over
        with trio.move_on_after(CLEANUP_TIMEOUT, shield=True):
            if state.control and not state.finished:
                # Left early (break, error, cancellation): the worker stops now, not at its next probe.
                kill = {protocol.KIND: protocol.KILL, protocol.TARGET: state.inbox}
                await self._publish(state.control, b"", kill)
            await aio.unsubscribe(subscription)

    async def stop(self, request_id: str) -> bool:
        """Ask the worker to finish the stream ``request_id`` early and gracefully: the chunks it made
        still arrive, then the end. Waits for the stream's first reply (which says where to send it);
        False if the stream is not running or ended first."""
        state = self._running.get(request_id)
        if state is None:
            return False
        await state.control_known.wait()
        if state.finished or not state.control:
            return False
        stop = {protocol.KIND: protocol.STOP, protocol.TARGET: state.inbox}
        await self._publish(state.control, b"", stop)
        return True

    async def call(self, endpoint: str, request: Any = None, **options: Any) -> Any:
        """Call a unary endpoint and return its one answer."""
        chunks = [chunk async for chunk in self.stream(endpoint, request, **options)]
        if len(chunks) != 1:
            raise IngressError(f"endpoint {endpoint!r} sent {len(chunks)} chunks; use stream()")
        return chunks[0]


class _ReplyState:
    """What the reply reader learned: where to send STOP or KILL (for this reply inbox), and whether
    the stream ended on its own."""

    __slots__ = ("control", "control_known", "finished", "inbox")

    def __init__(self, inbox: str = "") -> None:
        self.inbox = inbox
        self.control = ""
        self.control_known = trio.Event()
        self.finished = False

    def learn_control(self, headers: Mapping[str, str]) -> None:
        """The first reply that names the worker's control subject says where STOP and KILL go."""
        if not self.control and headers.get(protocol.CONTROL):
            self.control = headers[protocol.CONTROL]
            self.control_known.set()


async def _replies(
    receive: trio.MemoryReceiveChannel[Msg], stall_timeout: float, state: _ReplyState | None = None
) -> AsyncGenerator[Any, None]:
    state = state or _ReplyState()
    expected, received = 0, 0
    tail = protocol.TailLoss()  # what the worker's probes say it sent, against what arrived (SENT)
    while True:
        with trio.move_on_after(stall_timeout) as stall:
            msg = await receive.receive()
        if stall.cancelled_caught:
            message = (
                f"no message from the worker for {stall_timeout:g} s (stall_timeout): the stream is lost"
            )
            raise remote_error(ErrorCode.UNAVAILABLE, message, retryable=not received)
        headers = msg.headers or {}
        if headers.get("Status") == "503":
            message = "no worker serves this endpoint (no responders)"
            raise remote_error(ErrorCode.UNAVAILABLE, message, retryable=True)
        kind = headers.get(protocol.KIND)
        if kind == protocol.PROBE:  # the worker is alive; nothing to deliver, but a loss to find
            sent = headers.get(protocol.SENT, "")
            lost = tail.probed(int(sent) if sent.isdigit() else 0, expected)
            if lost is not None:
                message = f"replies were lost on the way ({lost})"
                raise remote_error(ErrorCode.UNAVAILABLE, message, retryable=not received)
            continue
        seq = int(headers.get(protocol.SEQ, "-1"))
        if seq != expected:
            raise remote_error(
                ErrorCode.UNAVAILABLE,
                f"reply stream lost messages (expected #{expected}, got #{seq})",
                retryable=not received,
            )
        expected += 1
        state.learn_control(headers)
        if kind == protocol.DATA:
            received += 1
            yield json.loads(msg.data)
            continue
        state.finished = True
        if kind == protocol.RESULT:
            yield json.loads(msg.data)
            return
        if kind != protocol.END:
            raise decode_error(msg.data)
        if int(headers.get(protocol.COUNT, "-1")) != received:
            raise remote_error(ErrorCode.UNAVAILABLE, "reply stream lost messages", retryable=not received)
        return


class NatsExchange:
    """A full-duplex exchange: ``send`` messages and ``end`` the input while iterating the answers.

    The worker's first reply (a credit grant) names the exchange's input subject; ``send`` publishes
    there, numbered, within the bytes granted, and waits while the credit is used up (the handler is
    behind). A message larger than the exchange's whole window can never be sent and is a BadRequest;
    once the worker ended or refused the exchange, ``send`` raises UNAVAILABLE (not retryable)."""

    def __init__(
        self,
        client: NatsClient,
        endpoint: str,
        deadline: float | None,
        metadata: Mapping[str, str] | None,
        request_id: str,
    ) -> None:
        self.client = client
        self.endpoint = endpoint
        self.request_id = request_id
        self._deadline = deadline
        self._metadata = metadata
        self._state = _ReplyState()
        self._replies: AsyncGenerator[Any, None] | None = None
        self._subscription: Any = None
        # What the worker's replies told us, kept up to date by the inbox callback (_watch).
        self._input = ""  # the input subject, from the first grant
        self._granted = 0  # bytes of messages we may have sent, in all
        self._window = 0  # the most credit ever outstanding: the exchange's whole window
        self._worker_done = False  # the worker ended or refused the exchange
        self._heard = 0.0  # when the worker was last heard from (any reply, a probe)
        self._changed = trio.Event()
        # What we sent.
        self._sent = 0
        self._seq = 0
        self._ended = False
        self._blocked_said = False

    async def __aenter__(self) -> NatsExchange:
        client = self.client
        send, receive = trio.open_memory_channel[Msg](STREAM_BUFFER)
        inbox, self._subscription = await aio.subscribe_inbox(
            client._client, send, self._watch, self._probe_answer
        )
        self._state.inbox = inbox
        self._heard = trio.current_time()
        client._running[self.request_id] = self._state
        try:
            headers = client._request_headers(self.request_id, self._deadline, self._metadata)
            headers[protocol.INPUT] = protocol.STREAM_INPUT
            await client._publish_request(self.endpoint, b"", headers, inbox)
        except BaseException:
            await client._finish(self.request_id, self._state, self._subscription)
            raise
        self._replies = _replies(receive, client.stall_timeout, self._state)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._replies is not None
        try:
            await self._replies.aclose()
        finally:
            await self.client._finish(self.request_id, self._state, self._subscription)

    def __aiter__(self) -> NatsExchange:
        return self

    async def __anext__(self) -> Any:
        assert self._replies is not None, "use the exchange as an async with block"
        return await self._replies.__anext__()

    async def send(self, message: Any) -> None:
        """Send one message (as JSON), waiting for credit."""
        await self.send_raw(json.dumps(message, separators=(",", ":")).encode())

    async def send_raw(self, data: bytes) -> None:
        """Send one message as it is: bytes the caller already encoded (one JSON document)."""
        if self._ended:
            raise BadRequest("send() after end(): this exchange's input is closed")
        while not self._input or self._granted - self._sent < len(data):
            self._raise_if_over()
            if self._window and len(data) > self._window:
                raise BadRequest(
                    f"a message of {len(data)} bytes cannot fit this exchange's window of "
                    f"{self._window} bytes (the endpoint's max_input_bytes)"
                )
            if self._input and not self._blocked_said:
                # Half a window may not come back for a while: ask for what room there is now.
                self._blocked_said = True
                await self.client._publish(self._input, b"", {protocol.KIND: protocol.BLOCKED})
            await self._wait_for_worker()
        if self._ended:  # end() came from another task while this one waited for credit
            raise BadRequest("send() after end(): this exchange's input is closed")
        self._raise_if_over()
        self._sent += len(data)
        await self.client._publish(self._input, data, self._next_headers(protocol.DATA))

    async def end(self) -> None:
        """Half-close: no more messages; the answers go on until the worker ends the exchange."""
        if self._ended:
            return
        self._ended = True
        while not self._input and not self._worker_done:
            await self._wait_for_worker()
        if not self._worker_done:
            await self.client._publish(self._input, b"", self._next_headers(protocol.END))

    async def stop(self) -> bool:
        """Ask the worker to finish early and gracefully (see ``NatsClient.stop``)."""
        return await self.client.stop(self.request_id)

    def _next_headers(self, kind: str) -> dict[str, str]:
        seq, self._seq = self._seq, self._seq + 1
        return {protocol.KIND: kind, protocol.SEQ: str(seq)}

    def _raise_if_over(self) -> None:
        if self._worker_done:
            raise ExchangeEnded

    async def _wait_for_worker(self) -> None:
        """Wait for the worker's next word; UNAVAILABLE once it has said nothing at all (no grant, no
        probe) for the stall timeout. Retryable only if it never answered: then nothing was run."""
        stall_timeout = self.client.stall_timeout
        with trio.move_on_after(stall_timeout):
            await self._changed.wait()
            return
        if trio.current_time() - self._heard >= stall_timeout:
            message = f"no word from the worker for {stall_timeout:g} s (stall_timeout): the exchange is lost"
            raise remote_error(ErrorCode.UNAVAILABLE, message, retryable=not self._input)

    def _watch(self, msg: Msg) -> bool:
        """sync, from the inbox callback: learn from every reply; True for a grant (consumed here, since
        the answers' reader may not be reading)."""
        self._heard = trio.current_time()
        headers = msg.headers or {}
        kind = headers.get(protocol.KIND)
        if protocol.CREDIT in headers:  # a grant, or a probe that carries the current one again
            self._input = self._input or headers.get(protocol.INPUT, "")
            self._granted = max(self._granted, int(headers.get(protocol.CREDIT, "0")))
            self._window = max(self._window, self._granted - self._sent)
            self._blocked_said = False
            self._state.learn_control(headers)
        elif kind in (protocol.END, protocol.RESULT, protocol.ERROR) or headers.get("Status") == "503":
            self._worker_done = True
        changed, self._changed = self._changed, trio.Event()
        changed.set()
        return kind == protocol.CREDIT_KIND

    def _probe_answer(self) -> bytes:
        """sync, from the inbox callback: what a probe from the worker is told, how many messages (and
        the end) this side has sent, so that the worker can tell one that never arrived."""
        return b"%d" % self._seq
