"""Subjects and headers of the NATS request plane (docs/protocol-nats.md); no I/O here.

A request is published to ``{namespace}.{endpoint}`` (queue group of the same name) with the caller's
inbox as reply subject. Every reply message carries ``Ingress-Kind`` (data, end, error) and
``Ingress-Seq`` (0, 1, 2, ... per request); ``end`` carries ``Ingress-Count``, the number of data
messages, so a caller can tell a complete stream from one that lost messages (NATS core is at most once).
A unary answer is a single ``result`` message: data and end in one, so a plain ``nc.request`` gets it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from runtime import IngressError, encode_error

KIND = "Ingress-Kind"
DATA = "data"
END = "end"
RESULT = "result"
ERROR = "error"
SEQ = "Ingress-Seq"
COUNT = "Ingress-Count"
REQUEST_ID = "Ingress-Request-Id"
TIMEOUT_MS = "Ingress-Timeout-Ms"
# The same deadline as wall-clock Unix seconds: a request that sat in a client's reconnect buffer arrives
# with its relative timeout intact, so only the absolute form shows that it is already too late.
DEADLINE = "Ingress-Deadline"
# Other headers of a request become the handler's metadata, without this prefix.
METADATA_PREFIX = "Meta-"


# On a request's first reply: the subject where the caller sends STOP or KILL for it.
CONTROL = "Ingress-Control"
# On a control message: which request (its reply inbox, unique per request).
TARGET = "Ingress-Target"
STOP = "stop"
KILL = "kill"

# Exchanges (a duplex endpoint, its input streamed; docs/protocol-nats.md "Exchanges"). On the request,
# ``Ingress-Input: stream`` asks for it; the worker's ``credit`` replies (unsequenced, cumulative) carry
# the exchange's input subject, its control subject and the total input bytes the caller may have sent.
INPUT = "Ingress-Input"
STREAM_INPUT = "stream"
CREDIT = "Ingress-Credit"
CREDIT_KIND = "credit"
# The caller's kinds on the input subject: a message (``data``, sequenced from 0), its half-close
# (``end``, numbered after the last message), and ``blocked`` (its next message does not fit the credit
# it has: the worker grants what room there is now instead of waiting for half a window).
BLOCKED = "blocked"

# On a probe: how many numbered replies the worker has made for the request so far. A caller that was
# told N by one probe, has fewer by the next and received nothing between them, lost replies (at the
# tail of an answer, where no later reply shows the gap).
SENT = "Ingress-Sent"


class TailLoss:
    """Finds numbered messages lost at the tail of a flow, where no later message shows the gap: the
    other side says at each probe how many it has sent; those it had sent by the previous probe (a whole
    interval ago) that have still not arrived, with nothing arriving since, were lost. The interval of
    grace keeps a message that is merely slow from counting as lost."""

    __slots__ = ("arrived_then", "sent_then")

    def __init__(self) -> None:
        self.sent_then = 0
        self.arrived_then = 0

    def probed(self, sent: int, arrived: int) -> str | None:
        """Record a probe's count; says what was lost, if anything was."""
        lost = arrived < self.sent_then and arrived == self.arrived_then
        verdict = f"{self.sent_then} sent, {arrived} arrived" if lost else None
        self.sent_then, self.arrived_then = sent, arrived
        return verdict


# The kind of a worker's liveness probe to a caller's inbox; a live caller answers it, and "no responders"
# means the caller is gone.
PROBE = "probe"


# What nats-py can connect to; anything else (http://, a bare word) would only fail later, after retries.
URL_SCHEMES = ("nats", "tls", "ws", "wss")


def check_url(url: str) -> str:
    """``url`` if it names a NATS server nats-py can reach (scheme, host, a valid port); otherwise
    ``ValueError`` with a message that shows the expected form. A typo must fail at once, not after a
    start-up spent retrying a server that cannot exist."""
    try:
        parts = urlsplit(url)
        valid = parts.scheme in URL_SCHEMES and bool(parts.hostname) and parts.port != 0
    except ValueError:  # .port: not a number, or out of range
        valid = False
    if not valid:
        schemes = ", ".join(f"{scheme}://" for scheme in URL_SCHEMES)
        raise ValueError(f"expected a NATS URL such as nats://127.0.0.1:4222 ({schemes}), got {url!r}")
    return url


def subject(namespace: str, endpoint: str) -> str:
    return f"{namespace}.{endpoint}"


def data_headers(seq: int) -> dict[str, str]:
    return {KIND: DATA, SEQ: str(seq)}


def control_subject(worker_id: str) -> str:
    return f"_INGRESS.control.{worker_id}"


def input_subject(worker_id: str, token: str) -> str:
    """The subject one exchange's caller publishes its messages to (one wildcard subscription per worker)."""
    return f"_INGRESS.input.{worker_id}.{token}"


def load_subject(namespace: str, worker_id: str) -> str:
    """Where a worker publishes its load report; a router subscribes to ``_INGRESS.load.<namespace>.*``."""
    return f"_INGRESS.load.{namespace}.{worker_id}"


def status_subjects(namespace: str, worker_id: str) -> tuple[str, str]:
    """Where a worker answers status requests: any worker of the namespace (the first answer is
    taken), and this one by its id."""
    return f"_INGRESS.status.{namespace}", f"_INGRESS.status.{namespace}.{worker_id}"


def input_wildcard(worker_id: str) -> str:
    return f"_INGRESS.input.{worker_id}.*"


def credit_headers(granted: int, input_subject: str, control: str) -> dict[str, str]:
    return {KIND: CREDIT_KIND, CREDIT: str(granted), INPUT: input_subject, CONTROL: control}


def end_headers(seq: int, count: int) -> dict[str, str]:
    return {KIND: END, SEQ: str(seq), COUNT: str(count)}


def result_headers(seq: int) -> dict[str, str]:
    """A unary answer: one message that is both the data and the end of the request."""
    return {KIND: RESULT, SEQ: str(seq)}


def error_message(seq: int, error: IngressError, retryable: bool) -> tuple[bytes, dict[str, str]]:
    """An error reply: the shared JSON error body (runtime/_wire_errors.py) with its headers."""
    return encode_error(error, retryable), {KIND: ERROR, SEQ: str(seq)}
