"""What the chaos scripts share: the tally of outcomes, the /metrics reading, the summary line, and the
drivers that consume one stream (``record_stream``) or run one exchange (``record_exchange``)."""

from __future__ import annotations

import argparse
import collections
import random
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import trio

from runtime import ErrorCode, IngressError


@dataclass
class Tally:
    """Every stream ends in exactly one outcome (completed, error:<CODE>, cut:<how>) or a violation."""

    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    violations: list[str] = field(default_factory=list)
    running: int = 0
    started_enough: trio.Event = field(default_factory=trio.Event)
    threshold: int = 0

    def stream_started(self) -> None:
        self.running += 1
        if self.running >= self.threshold:
            self.started_enough.set()

    def start_round(self, threshold: int) -> None:
        self.running, self.started_enough, self.threshold = 0, trio.Event(), threshold

    def cut_count(self) -> int:
        """Streams and exchanges this script cut (``cut:<how>``, ``exchange:cut:<how>``)."""
        return sum(v for k, v in self.outcomes.items() if k.startswith(("cut:", "exchange:cut:")))

    def report(self, name: str, expected: int, details: dict[str, object], *, exchanges: int = 0) -> int:
        """Print the one summary line (and the first violations); the exit status for the script.
        ``expected`` streams and ``exchanges`` exchanges must each have one outcome or violation."""
        refused = {
            k: v for k, v in self.outcomes.items() if "UNAUTHENTICATED" in k or "PERMISSION_DENIED" in k
        }
        if refused:  # every script sends a valid credential when --secure turns authentication on
            self.violations.append(f"requests refused for their credential: {refused}")
        total = sum(self.outcomes.values()) + len(self.violations)
        if total != expected + exchanges:
            self.violations.append(f"accounted for {total} streams and exchanges of {expected + exchanges}")
        outcomes = " ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items()))
        verdict = "OK" if not self.violations else "VIOLATIONS"
        extra = " ".join(f"{k}={v}" for k, v in details.items())
        counted = f"streams={expected}" + (f" exchanges={exchanges}" if exchanges else "")
        print(f"{name}: {counted} {outcomes} violations={len(self.violations)} {extra} -> {verdict}")
        for violation in self.violations[:20]:
            print(f"  violation: {violation}", file=sys.stderr)
        return 1 if self.violations else 0


async def inflight_from_metrics(address: tuple[str, int], *, patience: float = 0.0) -> tuple[float, float]:
    """(in-flight, disconnects) summed over every endpoint, from the worker's /metrics. ``patience``: how
    long in-flight may take to come back to 0 (an HTTP caller can read a response's last byte before the
    worker's handler has returned and been counted); a leak stays, however long the wait."""
    names = ("ingress_inflight_requests", "ingress_client_disconnects_total")
    deadline = trio.current_time() + patience
    sums = await _metrics(address, names)
    while sums.get(names[0], 0.0) and trio.current_time() < deadline:
        await trio.sleep(0.05)
        sums = await _metrics(address, names)
    return sums.get(names[0], 0.0), sums.get(names[1], 0.0)


async def check_engine_idle(address: tuple[str, int], tally: Tally, *, patience: float = 10.0) -> None:
    """With an engine mocker (``INGRESS_APP=runtime.mocker:aio_worker`` or ``thread_worker``), once the
    worker's in-flight count is back to 0 the fake engine must be generating nothing: a request whose
    caller went away was aborted in the engine too. ``patience`` covers a caller-gone probe (NATS)."""
    metrics: dict[str, float] = {}
    with trio.move_on_after(patience):
        while True:
            metrics = await _metrics(address, ("ingress_inflight_requests", "mocker_engine_running"))
            if metrics.get("ingress_inflight_requests") == 0:
                break
            await trio.sleep(0.1)
    running = metrics.get("mocker_engine_running")
    if running:  # None: not an engine mocker
        tally.violations.append(f"the engine still generates {running:g} requests after every caller left")


async def _metrics(address: tuple[str, int], names: tuple[str, ...], *, label: str = "") -> dict[str, float]:
    """The named samples of the worker's /metrics, summed over labels (absent names are left out);
    ``label`` (``direction="received"``) keeps only the samples that carry it."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://{address[0]}:{address[1]}/metrics")).text
    sums: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names and label in line:
            sums[name] = sums.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return sums


def run_cli(doc: str | None, main: Callable[..., Awaitable[int]], *, secure: bool = False) -> None:
    """The chaos scripts' shared command line: ``--short`` for CI, ``--seed`` for a reproducible run, and
    where the script supports it ``--secure`` (authentication and TLS on: ``main(short, seed, secure)``)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="a small, fast run for CI")
    parser.add_argument("--seed", type=int, default=1, help="random seed, for a reproducible run")
    if secure:
        parser.add_argument(
            "--secure", action="store_true", help="with --auth-tokens and TLS on (scripts/_secure.py)"
        )
    options = parser.parse_args()
    extra = (options.secure,) if secure else ()
    sys.exit(trio.run(main, options.short, options.seed, *extra))


async def record_stream(
    chunks: AsyncIterator[dict[str, object]],
    max_tokens: int,
    tally: Tally,
    hang_after: float,
    on_first_chunk: Callable[[], None] | None = None,
) -> None:
    """Consume one mocker stream and record how it ended: completed with every token in order, an
    explicit error (any IngressError, remote or local), or a violation (a hang or a silent cut)."""
    received: list[object] = []
    try:
        with trio.fail_after(hang_after):  # still open after this long: a hang, not a wait
            async for chunk in chunks:
                if not received and on_first_chunk is not None:
                    on_first_chunk()
                received.append(chunk["index"])
    except IngressError as error:
        tally.outcomes[f"error:{error.code.name}"] += 1
        return
    except trio.TooSlowError:
        tally.violations.append(f"stream hung after {len(received)} of {max_tokens} tokens")
        return
    if received == list(range(max_tokens)):
        tally.outcomes["completed"] += 1
    else:
        tally.violations.append(f"silently truncated: {len(received)} of {max_tokens} tokens, no error")


# ---- exchanges ------------------------------------------------------------------------------------------

EXCHANGE_ENDPOINT = "chat"  # runtime.mocker's exchange: message k is answered by turn k, n chunks long
# How many messages one exchange sends, and the most tokens one message asks for: the messages of one
# exchange each ask for a different number, so a turn's length names the message it answers.
EXCHANGE_MESSAGES = (2, 6)
EXCHANGE_MAX_TOKENS = 20
# A third of the exchanges hold their half-close back for up to EXCHANGE_PAUSE (a caller that thinks).
# In a round that signals the worker, every exchange holds it until the drain has begun (at most
# DRAIN_HOLD), so that the exchanges running at the signal certainly send input into the drain (over
# HTTP it begins only after the shutdown delay).
EXCHANGE_PAUSE = 0.5
DRAIN_HOLD = 5.0
# Errors that mean "not done": before any answer they must be retryable (docs/protocol-tcp.md, "Errors").
REFUSALS = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.OVERLOADED, ErrorCode.SHUTTING_DOWN})


class Exchange(Protocol):
    """One exchange as ``record_exchange`` drives it: the shape of ``TcpClient.exchange()``'s."""

    async def send(self, message: Any) -> None: ...

    async def end(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[Any]: ...


class ExchangeClient(Protocol):
    """A client whose ``exchange(endpoint)`` is an ``async with`` block giving an ``Exchange``; leaving the
    block kills the exchange if it still runs. ``TcpClient`` is one."""

    def exchange(self, endpoint: str) -> AbstractAsyncContextManager[Exchange]: ...


class SilentCut(Exception):
    """What an exchange's answers raise when they stop without an end or an error (the connection closed
    mid-answer, an error status without an error body): a caller must never see it, so a violation."""


@dataclass
class ExchangeLedger:
    """A round's exchanges as their callers saw them, to hold the worker's own counters against."""

    sent: int = 0  # messages whose send() began: the most the worker can have received
    completed: int = 0  # messages of the exchanges that completed: the least it must have received
    answers: int = 0  # answers read: the least it must have sent
    # In a round that signals the worker: set by the script once its drain has begun
    # (``shutdown.phase0.done``); ``through_drain`` counts the exchanges that completed although they
    # sent input after that.
    drain_begun: trio.Event | None = None
    through_drain: int = 0

    @property
    def draining(self) -> bool:
        return self.drain_begun is not None and self.drain_begun.is_set()


class ExchangeCheck:
    """One exchange's plan, and the caller's check of every answer against it.

    2 to 6 messages ``{"max_tokens": n, "itl_ms": 1 to 5}``, each with an n of its own (1 to 20): the
    first ones sent before any answer is read, each later one (and the half-close) once a random number
    of answers has arrived, so that sending and reading interleave; the half-close may wait a little
    more (``EXCHANGE_PAUSE``, ``DRAIN_HOLD``). Checked in sequence on both sides:
    the answers come as (turn 0, index 0), (0, 1), ..., each once, turn k exactly message k's n long
    with tokens ``tok<index>``, no turn before its message was sent, END only after the half-close and
    the last turn. Since the n differ, turn k having message k's length at every k is the worker's side
    of the check: it took each message exactly once, in order (one lost, doubled or swapped shifts a
    turn's length or the turn count)."""

    def __init__(self, rng: random.Random, ledger: ExchangeLedger) -> None:
        lengths = rng.sample(range(1, EXCHANGE_MAX_TOKENS + 1), rng.randint(*EXCHANGE_MESSAGES))
        self.turns = [{"max_tokens": n, "itl_ms": rng.randint(1, 5)} for n in lengths]
        self.waits = _plan_waits(rng, lengths)
        self.pause = rng.random() * EXCHANGE_PAUSE if rng.random() < 1 / 3 else 0.0
        self.ledger = ledger
        self.sent = 0  # messages whose send() began
        self.half_closed = False  # end() began
        self.input_in_drain = False  # a message or the half-close went out after ledger.draining
        self.answers = 0
        self.turn = self.index = 0  # the answer expected next
        self.outcome: str | None = None
        self.violation: str | None = None
        self._progress = trio.Event()  # set (and replaced) at each answer

    async def send_all(self, exchange: Exchange) -> None:
        """Send each message, then half-close, each once its wait is over. An error here (the worker
        ended or refused the exchange, the connection is gone) stops the sending: the answers say why."""
        try:
            for message, wait in zip(self.turns, self.waits, strict=False):
                await self._wait_answers(wait)
                self.sent += 1
                self.ledger.sent += 1
                await exchange.send(message)
                self.input_in_drain |= self.ledger.draining
            await self._wait_answers(self.waits[-1])
            await self._hold()
            self.half_closed = True
            await exchange.end()
            self.input_in_drain |= self.ledger.draining
        except IngressError:
            return

    async def read_all(self, exchange: Exchange, on_answer: Callable[[int], None] | None) -> None:
        """Read and check every answer up to the end; sets ``outcome`` or ``violation``."""
        try:
            async for answer in exchange:
                self.violation = self._check(answer)
                if self.violation is not None:
                    return
                self.answers += 1
                self.ledger.answers += 1
                self._progress.set()
                self._progress = trio.Event()
                if on_answer is not None:
                    on_answer(self.answers)
        except IngressError as error:
            self.errored(error)
            return
        except SilentCut as cut:
            self.violation = f"cut without an error after {self.answers} answers: {cut}"
            return
        self.violation = self._check_end()
        if self.violation is None:
            self.outcome = "exchange:completed"
            self.ledger.completed += len(self.turns)
            self.ledger.through_drain += self.input_in_drain

    def errored(self, error: IngressError) -> None:
        """An explicit error ends the exchange. Its retryable flag is never true after an answer (a retry
        would repeat it) and always true for a refusal before any (the drain's UNAVAILABLE)."""
        retryable = error.resolve_retryable(chunks_sent=self.answers)
        if error.retryable and self.answers:
            self.violation = (
                f"a retryable {error.code.name} after {self.answers} answers: a retry repeats them"
            )
        elif not retryable and not self.answers and error.code in REFUSALS:
            self.violation = f"{error.code.name} before any answer, not retryable: {error.message}"
        else:
            self.outcome = f"exchange:error:{error.code.name}"

    def _check(self, answer: Any) -> str | None:
        try:
            turn, index, token = answer["turn"], answer["index"], answer["token"]
        except (TypeError, KeyError):
            return f"an answer that is no turn's chunk: {answer!r}"
        if (turn, index) != (self.turn, self.index):
            asked = [t["max_tokens"] for t in self.turns]
            return (
                f"turn {turn} index {index} where turn {self.turn} index {self.index} was due (the messages "
                f"asked for {asked} tokens): an answer or a message lost, doubled or out of order"
            )
        if turn >= self.sent:
            return f"turn {turn} answered before message {turn} was sent"
        if token != f"tok{index}":
            return f"turn {turn} index {index} carries token {token!r}"
        self.index += 1
        if self.index == self.turns[turn]["max_tokens"]:
            self.turn, self.index = self.turn + 1, 0
        return None

    def _check_end(self) -> str | None:
        if not self.half_closed:
            return f"END before the half-close, after {self.answers} answers"
        if self.turn != len(self.turns):
            return f"END after {self.turn} of {len(self.turns)} turns (and {self.index} tokens of the next)"
        return None

    async def _hold(self) -> None:
        """Before the half-close: the pause, or in a round that signals the worker, until its drain."""
        drain_begun = self.ledger.drain_begun
        if drain_begun is None:
            await trio.sleep(self.pause)
            return
        with trio.move_on_after(DRAIN_HOLD):
            await drain_begun.wait()

    async def _wait_answers(self, count: int) -> None:
        while self.answers < count:
            await self._progress.wait()


def _plan_waits(rng: random.Random, lengths: list[int]) -> list[int]:
    """How many answers to wait for before each message and before the half-close: 0 for the first few
    (sent before anything is read), then a growing count, never more than the messages before can bring."""
    upfront = rng.randint(1, len(lengths))
    waits, answerable, floor = [], 0, 0
    for k, length in enumerate([*lengths, 0]):
        if k >= upfront:
            floor = rng.randint(floor, answerable)
        waits.append(floor)
        answerable += length
    return waits


async def record_exchange(
    client: ExchangeClient,
    tally: Tally,
    rng: random.Random,
    hang_after: float,
    ledger: ExchangeLedger,
    on_answer: Callable[[int], None] | None = None,
) -> None:
    """Run one ``chat`` exchange (``ExchangeCheck`` says how) and record how it ended:
    ``exchange:completed``, ``exchange:error:<CODE>`` (any IngressError, remote or the client's own), or
    a violation (an answer out of sequence, a silent cut, a hang past ``hang_after``). When cancelled
    (the script cut its connection) it records nothing: the caller counts the cut.
    ``on_answer(count)`` runs at each answer, with the count so far."""
    check = ExchangeCheck(rng, ledger)
    try:
        with trio.fail_after(hang_after):  # still open after this long: a hang, not a wait
            async with client.exchange(EXCHANGE_ENDPOINT) as exchange, trio.open_nursery() as nursery:
                nursery.start_soon(check.send_all, exchange)
                await check.read_all(exchange, on_answer)
                nursery.cancel_scope.cancel()  # a sender may still wait for answers that will not come
    except IngressError as error:  # the exchange did not even open (HTTP: the connection was refused)
        check.errored(error)
    except trio.TooSlowError:
        sent = f"{check.sent} of {len(check.turns)} messages sent"
        check.violation = f"hung after {check.answers} answers, {sent}"
    # Recorded after the last await: a cut that lands before it cancels this, and the caller counts it.
    if check.violation is not None:
        tally.violations.append(f"exchange {check.violation}")
    else:
        assert check.outcome is not None
        tally.outcomes[check.outcome] += 1


async def check_exchange_counters(address: tuple[str, int], ledger: ExchangeLedger, tally: Tally) -> str:
    """The worker's side of the count: ``ingress_exchange_messages_total`` (an exchange is counted when
    it leaves flight, so read with in-flight back at 0) between what the callers' ledger allows.
    Returns ``received/sent`` for the summary."""
    name = ("ingress_exchange_messages_total",)
    received = (await _metrics(address, name, label='direction="received"')).get(name[0], 0.0)
    sent = (await _metrics(address, name, label='direction="sent"')).get(name[0], 0.0)
    if not ledger.completed <= received <= ledger.sent:
        tally.violations.append(
            f"the worker counts {received:g} exchange messages received; the callers sent {ledger.sent}, "
            f"{ledger.completed} of them in exchanges that completed"
        )
    if sent < ledger.answers:
        tally.violations.append(
            f"the worker counts {sent:g} exchange answers sent; callers read {ledger.answers}"
        )
    return f"{received:g}/{sent:g}"
