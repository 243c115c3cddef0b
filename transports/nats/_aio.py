"""The asyncio side of the NATS transport: the only module where asyncio code lives.

nats-py is asyncio; the runtime is Trio. Every function here states its flavour. Crossings go only
through ``trio_asyncio.aio_as_trio``, and the hot paths avoid them: incoming messages reach Trio through
a memory channel fed synchronously from the asyncio callback, and a worker's replies reach the asyncio
``Publisher`` task through a synchronous queue (no crossing per message or per batch). Trio and asyncio
share one thread under trio-asyncio, so a sync call from either side into the other's objects is safe
as long as it does not wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import trio
import trio_asyncio
from nats.aio.client import DEFAULT_RECONNECT_TIME_WAIT, Client
from nats.aio.msg import Msg

from runtime.engines import open_asyncio_loop

_INBOX_FULL = b'{"code":"OVERLOADED","message":"worker inbox is full","retryable":true}'
_DRAINING = (
    b'{"code":"UNAVAILABLE","message":"worker is draining; send new requests elsewhere","retryable":true}'
)


@dataclass(frozen=True, slots=True)
class Outgoing:
    subject: str
    data: bytes
    headers: dict[str, str]
    reply: str = ""


# ---- asyncio flavour ------------------------------------------------------------------------------


class ConnectFailed(Exception):
    """A connection attempt failed; ``refused`` when the server answered and said no (credentials,
    TLS): trying again will not help, unlike a server that is down or unreachable."""

    def __init__(self, message: str, *, refused: bool) -> None:
        super().__init__(message)
        self.refused = refused


async def _connect(
    url: str,
    on_connected: Callable[[bool], None] | None = None,
    options: Mapping[str, Any] | None = None,
    on_error: Callable[[Exception], None] | None = None,
) -> Client:
    """asyncio: one attempt to connect (``ConnectFailed`` otherwise: whether and when to try again is
    the caller's choice); once connected, reconnect forever in the background, since a worker
    outlives server restarts. ``on_connected(False/True)`` is told when the connection is lost and
    when it is back, ``on_error`` of errors nats-py reports. ``options`` go to ``nats.connect`` as they
    are (token, user_credentials, tls, ...) and win over these defaults."""
    seen: list[Exception] = []  # errors of the first connect: the cause for ConnectFailed
    connected = False

    async def error_cb(exc: Exception) -> None:
        if not connected:
            seen.append(exc)
        elif on_error is not None:
            on_error(exc)

    async def disconnected() -> None:
        if connected and on_connected is not None:  # not for the attempts of the first connect
            on_connected(False)

    async def reconnected() -> None:
        if on_connected is not None:
            on_connected(True)

    options = dict(options or {})
    # Once connected: reconnect forever, unless the caller chose otherwise.
    afterwards = {**_RECONNECT_FOREVER, **{k: options[k] for k in _RECONNECT_FOREVER if k in options}}
    settings = {
        "disconnected_cb": disconnected,
        "reconnected_cb": reconnected,
        "error_cb": error_cb,
        **options,
        **_FIRST_CONNECT,
    }
    client = Client()
    try:
        await client.connect(url, **settings)
    except Exception as exc:
        _drop_unsendable(client)
        with contextlib.suppress(Exception):  # nats-py leaves the refused socket open otherwise
            await client.close()
        cause = seen[0] if seen else exc  # nats-py may end with "no servers"; the first error says why
        raise ConnectFailed(str(cause) or repr(cause), refused=_is_refusal(cause)) from cause
    connected = True  # from now on errors go to on_error
    # nats-py reads these options afresh at each reconnect, so they take effect from here on.
    client.options.update(afterwards)
    return client


# nats-py's first connect otherwise loops forever, a refused one included ("0" means "no limit" to
# its server pool); these make it give up after one round.
_FIRST_CONNECT = {"allow_reconnect": False, "max_reconnect_attempts": 1, "reconnect_time_wait": 0}
_RECONNECT_FOREVER = {
    "allow_reconnect": True,
    "max_reconnect_attempts": -1,
    "reconnect_time_wait": DEFAULT_RECONNECT_TIME_WAIT,
}


def _is_refusal(exc: Exception) -> bool:
    """The server answered and refused us: credentials, permissions or TLS, not an outage."""
    refusals = (
        nats.errors.AuthorizationError,
        nats.errors.InvalidUserCredentialsError,
        nats.errors.SecureConnRequiredError,
        nats.errors.SecureConnWantedError,
        ssl.SSLCertVerificationError,
    )
    # A plain nats.errors.Error at connect time carries the server's -ERR line ('Authorization
    # Violation', ...); its subclasses are the client's own conditions (timeouts, no servers, ...).
    return type(exc) is nats.errors.Error or isinstance(exc, refusals)


async def _subscribe(client: Client, subject: str, queue: str, inbox: trio.MemorySendChannel[Msg]) -> Any:
    """asyncio: a queue subscription whose callback hands each message to Trio without a crossing."""

    async def deliver(msg: Msg) -> None:
        try:
            inbox.send_nowait(msg)
        except trio.WouldBlock:
            # Trio is behind by a whole buffer: refuse rather than queue without bound.
            await _refuse(msg, _INBOX_FULL)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            # Delivered after the drain handed the inbox's last messages to Trio (nats-py can still
            # run a callback then): the caller must not wait for a reply that will never come.
            await _refuse(msg, _DRAINING)

    async def _refuse(msg: Msg, body: bytes) -> None:
        if msg.reply:
            await client.publish(msg.reply, body, headers={"Ingress-Kind": "error", "Ingress-Seq": "0"})

    return await client.subscribe(subject, queue=queue, cb=deliver)  # queue "" means every message


async def _subscribe_handled(client: Client, subject: str, handle: Callable[[Msg], None]) -> Any:
    """asyncio: a plain subscription whose every message ``handle`` (sync) takes in the callback itself:
    for messages that must not be dropped when Trio is behind (an exchange's input, which its credit
    already bounds; STOP and KILL) and that need no task of their own."""

    async def deliver(msg: Msg) -> None:
        handle(msg)

    return await client.subscribe(subject, cb=deliver)


async def _publish_batch(client: Client, batch: Sequence[Outgoing]) -> None:
    """asyncio: publish every message of a batch into nats-py's pending buffer.

    No ``client.flush()``: in nats-py that is a PING/PONG round trip to the server, which doubled the
    latency of every small request; nats-py's own flusher writes the pending buffer out promptly."""
    for message in batch:
        await client.publish(message.subject, message.data, reply=message.reply, headers=message.headers)


# Subject, headers and bookkeeping of one queued message, counted against the back-pressure bound.
MESSAGE_OVERHEAD = 256


class Publisher:
    """Publishes the worker's replies from one long-lived asyncio task, so that Trio hands messages over
    with a plain method call instead of a crossing per batch.

    ``put_nowait`` (sync, any flavour) queues a message and, on the first of a batch, wakes the task;
    ``run`` (asyncio) publishes everything queued into nats-py's pending buffer, whose flusher writes
    the whole batch out in one go. ``on_taken`` (sync) is called each time the queue is emptied, so the
    Trio side can release callers it held back; ``on_failed(count, exc)`` when a batch cannot be
    published (an outage longer than nats-py's reconnect buffer)."""

    def __init__(
        self,
        client: Client,
        on_taken: Callable[[], object],
        on_failed: Callable[[int, Exception], None],
    ) -> None:
        self._client = client
        self._on_taken = on_taken
        self._on_failed = on_failed
        self._queue: list[Outgoing] = []
        self._wake = asyncio.Event()
        # What is queued and not yet handed to nats-py, for the caller's back-pressure.
        self.queued_bytes = 0

    def put_nowait(self, message: Outgoing) -> None:
        """sync: queue one message; only the first of a batch costs a wake-up of the asyncio task."""
        self._queue.append(message)
        self.queued_bytes += len(message.data) + MESSAGE_OVERHEAD
        if len(self._queue) == 1:
            self._wake.set()

    async def _run(self) -> None:
        """asyncio: publish batches until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._publish_queued()

    async def _publish_queued(self) -> None:
        """asyncio: publish what is queued now. A publish can wait (nats-py's pending buffer is full
        while the socket is backed up); cancelled there (phase 3), the rest of the batch goes back to
        the queue for ``close`` to publish, not lost."""
        batch, self._queue = self._queue, []
        self.queued_bytes = 0
        self._on_taken()
        for index, message in enumerate(batch):
            try:
                await self._client.publish(
                    message.subject, message.data, reply=message.reply, headers=message.headers
                )
                # nats-py swallows a cancellation that lands while publish waits for its flusher
                # (_flush_pending catches CancelledError): without this check a cancelled publisher
                # would carry on, and phase 3 would wait on a stalled server for ever.
                if _cancel_requested():
                    raise asyncio.CancelledError
            except asyncio.CancelledError:
                # nats-py puts a message in its pending buffer before it can wait, so this one is
                # handed over already; the ones after it are not.
                self._requeue(batch[index + 1 :])
                raise
            except Exception as exc:
                self._on_failed(len(batch) - index, exc)
                return

    def _requeue(self, unpublished: list[Outgoing]) -> None:
        self._queue[:0] = unpublished
        self.queued_bytes += sum(len(message.data) + MESSAGE_OVERHEAD for message in unpublished)

    async def _close(self) -> None:
        """asyncio: publish what is left, flush it, and close the connection (phase 3)."""
        await self._publish_queued()
        await _close(self._client)

    async def run(self) -> None:
        """trio: the publishing task, for the transport's nursery (cancelled in phase 3)."""
        await trio_asyncio.aio_as_trio(self._run)()

    async def close(self) -> None:
        """trio: publish what is left and close the connection."""
        await trio_asyncio.aio_as_trio(self._close)()


def _cancel_requested() -> bool:
    """asyncio: whether the current task was asked to stop, even if the CancelledError was swallowed."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _drain_subscription(client: Client, subscription: Any) -> None:
    """asyncio: stop receiving; messages already delivered are still processed. A connection that is
    down cannot take the drain (its PING would wait for a PONG that never comes), and the intake is
    closing anyway, so that must neither fail nor hold up the shutdown.

    The caller must not cancel this halfway (shield it, bounded): nats-py's drain waits for a PONG, and
    a cancelled wait leaves a cancelled future in its PONG queue; the PONG that arrives later raises
    ``InvalidStateError`` in nats-py's read loop, which prints a traceback and stops reading."""
    if not client.is_connected:
        return
    with contextlib.suppress(Exception):
        await subscription.drain()


async def _close(client: Client) -> None:
    """asyncio: flush what is queued and close the connection (phase 3).

    Not ``client.drain()``: by phase 3 every subscription was already drained in phase 1 and every
    reply batch flushed by the outbox, and a second drain was seen to hang here now and then."""
    if client.is_closed:
        return
    with contextlib.suppress(Exception):  # a server already gone cannot take a flush
        await client.flush(timeout=1)
    _drop_unsendable(client)
    # nats-py re-raises a connection error it saw earlier (even after reconnecting); we are closing.
    with contextlib.suppress(OSError):
        await client.close()


def _drop_unsendable(client: Client) -> None:
    """sync: forget what nats-py still holds for a connection that is already lost.

    ``Client.close()`` hands its pending buffer to ``writelines`` on the current transport. On CPython
    3.12 and 3.13.0 the selector transport's ``writelines`` lacks the lost-connection guard that
    ``write`` has and calls a handler it already cleared: ``TypeError: 'NoneType' object is not
    callable`` (python/cpython#136234, fixed upstream later), so a worker whose server went away
    (a restart it had not yet recovered from, or a server stopped before the worker) failed in phase 3
    instead of exiting cleanly, and the rest of nats-py's close (subscription tasks, callbacks) never
    ran. Nothing can be sent on a lost connection anyway; ``write`` would drop it too. Remove once
    every supported Python carries the fix. (The bug's other face, a writer registered for a closed
    socket, is handled for the whole loop: runtime/_asyncio_guard.py.) Private attributes of nats-py,
    hence the getattr."""
    writer = getattr(client._transport, "_io_writer", None)  # nats-py's TcpTransport
    transport = getattr(writer, "transport", None)
    if transport is not None and transport.is_closing():
        client._pending = []
        client._pending_data_size = 0


async def _probe(client: Client, inbox: str, patience: float, headers: dict[str, str]) -> bytes | None:
    """asyncio: is anyone still subscribed to ``inbox``? None if not (only "no responders" counts as
    gone); else what the caller answered (an exchange's caller says how many messages it sent), or b""
    when it could not tell."""
    try:
        reply = await client.request(inbox, b"", timeout=patience, headers=headers)
    except nats.errors.NoRespondersError:
        return None
    except nats.errors.TimeoutError:
        return b""  # slow, not gone: the next probe decides
    except Exception:  # reconnecting, or closing: we cannot tell, so we do not kill anything
        return b""
    return bytes(reply.data)


async def _request(client: Client, subject: str, patience: float) -> bytes | None:
    """asyncio: one request with an empty body and its first reply; None when nobody answers (no
    responders, or nothing within ``patience`` seconds)."""
    try:
        reply = await client.request(subject, b"", timeout=patience)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return None
    return bytes(reply.data)


async def _probe_all(
    client: Client, probes: Sequence[tuple[str, dict[str, str]]], patience: float
) -> list[bytes | None]:
    """asyncio: probe many inboxes at once (one crossing for all the worker's running requests)."""
    return list(
        await asyncio.gather(*(_probe(client, inbox, patience, headers) for inbox, headers in probes))
    )


async def _subscribe_inbox(
    client: Client,
    inbox: trio.MemorySendChannel[Msg],
    watch: Callable[[Msg], bool] | None = None,
    probe_answer: Callable[[], bytes] | None = None,
) -> tuple[str, Any]:
    """asyncio: a fresh reply inbox whose messages go to Trio without a crossing; liveness probes from
    the worker are answered right here (with ``probe_answer()``, if given), also without a crossing.
    ``watch`` (sync) sees every message first and keeps those it returns True for (an exchange's credit
    grants, which must be taken in even while nobody reads the answers)."""
    subject = client.new_inbox()

    async def deliver(msg: Msg) -> None:
        if msg.headers and msg.headers.get("Ingress-Kind") == "probe":
            # Answered here, without a crossing; still passed on below, as a heartbeat: it tells the
            # caller's stall detection that the worker is alive.
            await msg.respond(probe_answer() if probe_answer is not None else b"")
        if watch is not None and watch(msg):
            return
        # A caller that stopped reading loses replies; its gap detection reports a short stream.
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            inbox.send_nowait(msg)

    return subject, await client.subscribe(subject, cb=deliver)


async def _unsubscribe(subscription: Any) -> None:
    """asyncio: drop a reply inbox."""
    await subscription.unsubscribe()


# ---- trio flavour: the loop and the crossings -------------------------------------------------------


def open_loop() -> AbstractAsyncContextManager[Any]:
    """trio: the worker's asyncio loop when it has one (``Worker(asyncio=True)``: shared with the
    handlers' engines), else a new ``trio_asyncio.open_loop()``; an error raised by the block comes
    out as itself, not wrapped in the loop's nursery groups (so ``except Unavailable`` works around a
    client block)."""
    return open_asyncio_loop()


# The crossings.

connect = trio_asyncio.aio_as_trio(_connect)
subscribe = trio_asyncio.aio_as_trio(_subscribe)
subscribe_handled = trio_asyncio.aio_as_trio(_subscribe_handled)
publish_batch = trio_asyncio.aio_as_trio(_publish_batch)
drain_subscription = trio_asyncio.aio_as_trio(_drain_subscription)
close = trio_asyncio.aio_as_trio(_close)
subscribe_inbox = trio_asyncio.aio_as_trio(_subscribe_inbox)
probe_all = trio_asyncio.aio_as_trio(_probe_all)
request = trio_asyncio.aio_as_trio(_request)
unsubscribe = trio_asyncio.aio_as_trio(_unsubscribe)
