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
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://{address[0]}:{address[1]}/metrics")).text
    sums = {"ingress_inflight_requests": 0.0, "ingress_client_disconnects_total": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in sums:
            sums[name] += float(line.rsplit(" ", 1)[1])
    return sums["ingress_inflight_requests"], sums["ingress_client_disconnects_total"]


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
