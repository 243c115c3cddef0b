"""What the chaos scripts share: the tally of stream outcomes, the /metrics reading, the summary line."""

from __future__ import annotations

import argparse
import collections
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import trio

from runtime import IngressError


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
        return sum(v for k, v in self.outcomes.items() if k.startswith("cut:"))

    def report(self, name: str, expected: int, details: dict[str, object]) -> int:
        """Print the one summary line (and the first violations); the exit status for the script."""
        total = sum(self.outcomes.values()) + len(self.violations)
        if total != expected:
            self.violations.append(f"accounted for {total} streams of {expected}")
        outcomes = " ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items()))
        verdict = "OK" if not self.violations else "VIOLATIONS"
        extra = " ".join(f"{k}={v}" for k, v in details.items())
        print(f"{name}: streams={expected} {outcomes} violations={len(self.violations)} {extra} -> {verdict}")
        for violation in self.violations[:20]:
            print(f"  violation: {violation}", file=sys.stderr)
        return 1 if self.violations else 0


async def inflight_from_metrics(address: tuple[str, int]) -> tuple[float, float]:
    """(in-flight, disconnects) summed over every endpoint, from the worker's /metrics."""
    names = ("ingress_inflight_requests", "ingress_client_disconnects_total")
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


async def _metrics(address: tuple[str, int], names: tuple[str, ...]) -> dict[str, float]:
    """The named samples of the worker's /metrics, summed over labels (absent names are left out)."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://{address[0]}:{address[1]}/metrics")).text
    sums: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            sums[name] = sums.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return sums


def run_cli(doc: str | None, main: Callable[[bool, int], Awaitable[int]]) -> None:
    """The chaos scripts' shared command line: ``--short`` for CI, ``--seed`` for a reproducible run."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="a small, fast run for CI")
    parser.add_argument("--seed", type=int, default=1, help="random seed, for a reproducible run")
    options = parser.parse_args()
    sys.exit(trio.run(main, options.short, options.seed))


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
