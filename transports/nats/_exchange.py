"""The worker's side of NATS exchanges: each exchange's input on its own subject, in sequence and
within the credit the worker grants (docs/protocol-nats.md, "Exchanges").

NATS has no connection between a caller and the worker serving it, so flow control is explicit: the
worker tells the caller, in ``credit`` replies, how many bytes of messages it may have sent in all
(cumulative, so a lost or late grant is made good by the next). Grants come in halves of the window
(the endpoint's ``max_input_bytes``), not one per message; a caller whose next message does not fit
says ``blocked`` and is granted whatever room there is at once, so no message size can deadlock.
Messages are numbered: a gap (NATS delivers at most once, and a reconnect can drop some) fails the
exchange explicitly rather than hand the handler an input with a hole in it. A loss at the tail has no
later message to show it, and a lost grant would leave the caller waiting for credit it already has, so
the worker's liveness probes carry the current grant, and the caller answers them with how many
messages it has sent: one still missing a probe interval later, with nothing arriving meanwhile, was
lost.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from nats.aio.msg import Msg

from runtime import BadRequest, Call, Inbox, KillReason, RequestContext, Unavailable

from . import _aio as aio
from . import _protocol as protocol


class ExchangeInputs:
    """Every exchange of a worker whose caller streams its input, by the token of its input subject."""

    def __init__(self, worker_id: str, control: str, publish: Callable[[aio.Outgoing], None]) -> None:
        self.worker_id = worker_id
        self.control = control
        self.subscription_subject = protocol.input_wildcard(worker_id)
        # Grants are tiny and bounded by the input itself: they skip the outbox's back-pressure.
        self.publish = publish
        self._inputs: dict[str, ExchangeInput] = {}
        self._by_reply: dict[str, ExchangeInput] = {}  # the same, by the caller's reply inbox

    def open(self, call: Call, reply: str, first: bytes) -> ExchangeInput:
        """Give the exchange its input subject, take its first message (sent with the request, so it
        used no credit) and send the first grant, which announces the subject."""
        inbox = call.inbox
        assert inbox is not None, "only a duplex endpoint's call has an input"
        # Unguessable: whoever knows an exchange's input subject can write into it (or break it with a
        # gap), and every caller of this worker learns its id from Ingress-Control.
        token = secrets.token_hex(16)
        subject = protocol.input_subject(self.worker_id, token)
        exchange_input = ExchangeInput(self, token, subject, call.ctx, inbox, reply)
        self._inputs[token] = self._by_reply[reply] = exchange_input
        if first:
            inbox.offer(first)
        inbox.on_consumed = exchange_input.grant
        exchange_input.grant(announce=True)
        return exchange_input

    def close(self, exchange_input: ExchangeInput) -> None:
        """The exchange is over: what its caller still sends is dropped as it arrives."""
        self._inputs.pop(exchange_input.token, None)
        if self._by_reply.get(exchange_input.reply) is exchange_input:
            del self._by_reply[exchange_input.reply]

    def probe_headers(self, reply: str) -> dict[str, str]:
        """The headers of a liveness probe to ``reply``: an exchange's carry its current grant again."""
        exchange_input = self._by_reply.get(reply)
        if exchange_input is None:
            return {protocol.KIND: protocol.PROBE}
        return {
            **protocol.credit_headers(exchange_input.granted, exchange_input.subject, self.control),
            protocol.KIND: protocol.PROBE,
        }

    def probed(self, reply: str, answer: bytes) -> None:
        """A live caller answered a probe, an exchange's caller with how many messages it has sent."""
        exchange_input = self._by_reply.get(reply)
        if exchange_input is not None and answer.isdigit():
            exchange_input.claimed(int(answer))

    def receive(self, msg: Msg) -> None:
        exchange_input = self._inputs.get(msg.subject.rpartition(".")[2])
        if exchange_input is not None:  # else the exchange ended: its END crossed this on the way
            exchange_input.receive(msg)


class ExchangeInput:
    """One exchange's input: the next sequence number expected, and the bytes granted and received."""

    __slots__ = (
        "_owner",
        "blocked",
        "ctx",
        "expected",
        "granted",
        "inbox",
        "received",
        "reply",
        "subject",
        "tail",
        "token",
    )

    def __init__(
        self, owner: ExchangeInputs, token: str, subject: str, ctx: RequestContext, inbox: Inbox, reply: str
    ) -> None:
        self._owner = owner
        self.token = token
        self.subject = subject
        self.ctx = ctx
        self.inbox = inbox
        self.reply = reply
        self.expected = 0
        self.granted = 0  # bytes of messages the caller may have sent on the input subject, in all
        self.received = 0
        self.blocked = False  # the caller's next message does not fit what it has
        self.tail = protocol.TailLoss()  # what the caller says it sent, against what arrived

    def receive(self, msg: Msg) -> None:
        headers = msg.headers or {}
        kind = headers.get(protocol.KIND)
        if kind == protocol.BLOCKED:
            self.blocked = True
            self.grant()
            return
        seq = headers.get(protocol.SEQ, "")
        if seq != str(self.expected):
            message = f"the caller's messages were lost on the way (expected #{self.expected}, got #{seq})"
            self._fail(Unavailable(message))  # retryable if nothing was answered yet
            return
        self.expected += 1
        if self.inbox.ended:  # numbered after the caller's own end: it broke its own input
            self._fail(BadRequest(f"a {kind!r} message after the caller's end of its input"))
            return
        if kind == protocol.END:
            self.inbox.end()
            return
        if kind != protocol.DATA:
            self._fail(BadRequest(f"unknown Ingress-Kind {kind!r} on an exchange's input subject"))
            return
        size = len(msg.data)
        if self.received + size > self.granted:
            available = self.granted - self.received
            self._fail(BadRequest(f"flow control: a message of {size} bytes with {available} of credit"))
            return
        self.received += size
        self.inbox.offer(msg.data)  # fits: what waits plus what was granted never exceeds the window

    def claimed(self, sent: int) -> None:
        """The caller says (answering a probe) that it has sent ``sent`` messages."""
        lost = self.tail.probed(sent, self.expected)
        if lost is not None:
            self._fail(Unavailable(f"the caller's messages were lost on the way ({lost})"))

    def grant(self, _consumed: int = 0, *, announce: bool = False) -> None:
        """Top the caller's credit up to the window, once there is half a window to give (or at once,
        whatever there is, when the caller said it is blocked). The first grant goes out whatever it
        holds: it tells the caller where to send."""
        if self.inbox.closed:
            return  # the handler is done: the exchange's end is on the way, no more input is wanted
        outstanding = self.granted - self.received
        room = max(0, self.inbox.limit - self.inbox.queued_bytes - outstanding)
        if not announce and (room == 0 or (room * 2 < self.inbox.limit and not self.blocked)):
            return
        self.granted += room
        self.blocked = False
        headers = protocol.credit_headers(self.granted, self.subject, self._owner.control)
        self._owner.publish(aio.Outgoing(self.reply, b"", headers))

    def _fail(self, error: BadRequest | Unavailable) -> None:
        """The input is broken: the exchange ends with ``error`` now, whether or not its handler is
        reading (one that is not would never hear of it)."""
        self._owner.close(self)
        self.ctx.kill(KillReason.BAD_INPUT, error)
