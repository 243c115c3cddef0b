"""Admission control: concurrency limit, bounded FIFO queue, deadlines, cancellation and shutdown."""

import pytest
import trio
import trio.testing

from runtime import Admission, ErrorCode, Rejected


async def _hold(
    admission: Admission, release: trio.Event, log: list[str], name: str, deadline: float = float("inf")
) -> None:
    try:
        async with admission.slot(deadline):
            log.append(f"start {name}")
            await release.wait()
    except Rejected as rejected:
        log.append(f"rejected {name} {rejected.reason}")


async def test_queue_is_fifo_and_bounded(autojump_clock):
    """Callers beyond the limit queue in order; a full queue rejects at once as overloaded (retryable)."""
    admission = Admission(max_concurrency=1, max_queue=2)
    release = trio.Event()
    log: list[str] = []
    async with trio.open_nursery() as nursery:
        for name in "abcd":
            nursery.start_soon(_hold, admission, release, log, name)
            await trio.testing.wait_all_tasks_blocked()
        assert log == ["start a", "rejected d overloaded"]
        assert admission.statistics().queued == 2
        release.set()
    assert log[2:] == ["start b", "start c"]
    assert admission.statistics().running == 0


async def test_queued_caller_rejected_at_its_deadline(autojump_clock):
    """A queued caller waits exactly until its deadline, then is rejected with DEADLINE_EXCEEDED."""
    admission = Admission(max_concurrency=1, max_queue=4)
    release = trio.Event()
    log: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_hold, admission, release, log, "a")
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        with pytest.raises(Rejected) as caught:
            async with admission.slot(start + 5):
                pass
        assert trio.current_time() - start == pytest.approx(5)
        assert caught.value.reason == "deadline"
        assert caught.value.code is ErrorCode.DEADLINE_EXCEEDED
        release.set()


async def test_cancelled_waiter_frees_its_place_at_once(autojump_clock):
    """A caller cancelled while queued leaves the queue immediately; the next caller gets the slot."""
    admission = Admission(max_concurrency=1, max_queue=1)
    release = trio.Event()
    log: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_hold, admission, release, log, "a")
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as scope:
            nursery.start_soon(lambda: _cancel_later(scope))
            async with admission.slot():
                pytest.fail("should never get the slot")
        assert admission.statistics().queued == 0
        nursery.start_soon(_hold, admission, release, log, "b")
        await trio.testing.wait_all_tasks_blocked()
        assert log == ["start a"]
        release.set()
    assert log == ["start a", "start b"]


async def _cancel_later(scope: trio.CancelScope) -> None:
    await trio.testing.wait_all_tasks_blocked()
    scope.cancel()


async def test_close_rejects_queued_and_later_callers_as_shutting_down(autojump_clock):
    """close() turns every queued caller away with retryable SHUTTING_DOWN, and every later caller too."""
    admission = Admission(max_concurrency=1, max_queue=5)
    release = trio.Event()
    log: list[str] = []
    async with trio.open_nursery() as nursery:
        for name in "abc":
            nursery.start_soon(_hold, admission, release, log, name)
            await trio.testing.wait_all_tasks_blocked()
        admission.close()
        await trio.testing.wait_all_tasks_blocked()
        # Woken together, so in any order (Trio randomizes it): both are turned away.
        assert log[0] == "start a"
        assert sorted(log[1:]) == ["rejected b shutting_down", "rejected c shutting_down"]
        with pytest.raises(Rejected) as caught:
            async with admission.slot():
                pass
        assert caught.value.code is ErrorCode.SHUTTING_DOWN and caught.value.retryable
        release.set()


def test_invalid_limits_are_refused():
    """Nonsense limits fail loudly at registration, not at the first request."""
    with pytest.raises(ValueError, match="max_concurrency"):
        Admission(max_concurrency=0)
    with pytest.raises(ValueError, match="max_queue"):
        Admission(max_queue=-1)


async def _timed_request(
    admission: Admission, tenant: str, work: float, waits: dict[str, list[float]], weight: float = 1.0
) -> None:
    """One request of ``tenant``: wait for a slot (recording how long), then hold it for ``work`` s."""
    start = trio.current_time()
    async with admission.slot(tenant=tenant, weight=weight):
        waits.setdefault(tenant, []).append(trio.current_time() - start)
        await trio.sleep(work)


async def test_a_bursting_tenant_delays_another_by_its_fair_share_only(autojump_clock):
    """Tenant A queues 50 one-second requests; B's one request, arriving later, waits about one of
    them, not all 50 (FIFO would make it wait 50 s)."""
    admission = Admission(max_concurrency=1, max_queue=100)
    waits: dict[str, list[float]] = {}
    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(_timed_request, admission, "A", 1.0, waits)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.5)
        nursery.start_soon(_timed_request, admission, "B", 1.0, waits)
    assert waits["B"][0] <= 1.5  # the rest of A's running request, then B's turn
    assert max(waits["A"]) >= 49  # A's own burst still runs to the end, in order


async def test_weights_share_the_slots_in_proportion(autojump_clock):
    """A (weight 3) and B (weight 1), 40 requests each queued at once: of the first 20 served, 15 are A's."""
    admission = Admission(max_concurrency=1, max_queue=100)
    served: list[str] = []

    async def one(tenant: str, weight: float) -> None:
        async with admission.slot(tenant=tenant, weight=weight):
            served.append(tenant)
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "first", 1.0)  # holds the slot while the others queue
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(40):
            nursery.start_soon(one, "A", 3.0)
            nursery.start_soon(one, "B", 1.0)
        await trio.testing.wait_all_tasks_blocked()
    assert abs(served[1:21].count("A") - 15) <= 1


async def _hold_as(admission: Admission, release: trio.Event, log: list[str], tenant: str, name: str) -> None:
    """``_hold`` for one tenant: logs the start or the rejection (reason, and whether retryable)."""
    try:
        async with admission.slot(tenant=tenant):
            log.append(f"start {name}")
            await release.wait()
    except Rejected as rejected:
        log.append(f"rejected {name} {rejected.reason} {rejected.resolve_retryable(chunks_sent=0)}")


async def test_a_full_queue_makes_room_for_a_tenant_with_fewer_waiters(autojump_clock):
    """A fills the queue; B's request takes A's newest place (A's is refused OVERLOADED, retryable,
    reason tenant_share); a second A request, still the longest queue, is refused outright."""
    admission = Admission(max_concurrency=1, max_queue=4)
    release = trio.Event()
    log: list[str] = []
    async with trio.open_nursery() as nursery:
        for tenant, name in (
            ("A", "a0"),
            ("A", "a1"),
            ("A", "a2"),
            ("A", "a3"),
            ("A", "a4"),
            ("B", "b0"),
            ("A", "a5"),
        ):
            nursery.start_soon(_hold_as, admission, release, log, tenant, name)
            await trio.testing.wait_all_tasks_blocked()
        assert log == ["start a0", "rejected a4 tenant_share True", "rejected a5 overloaded True"]
        release.set()
    assert log[3:] == ["start a1", "start b0", "start a2", "start a3"]  # FIFO would serve b0 last


@pytest.mark.parametrize(("max_queue", "third"), [(10, "queued"), (0, "rejected a2 tenant_limit True")])
async def test_a_tenant_limit_keeps_slots_for_the_others(max_queue, third, autojump_clock):
    """max 4 running, 2 per tenant: A's third request waits (or, with no queue, is refused naming the
    tenant limit) while B starts at once on a free slot."""
    admission = Admission(max_concurrency=4, max_queue=max_queue, tenant_limit=2)
    release = trio.Event()
    log: list[str] = []
    async with trio.open_nursery() as nursery:
        for tenant, name in (("A", "a0"), ("A", "a1"), ("A", "a2"), ("B", "b0")):
            nursery.start_soon(_hold_as, admission, release, log, tenant, name)
            await trio.testing.wait_all_tasks_blocked()
        assert log[:2] == ["start a0", "start a1"] and "start b0" in log
        assert next((line for line in log if "a2" in line), "queued") == third
        assert admission.statistics().queued == (1 if max_queue else 0)
        release.set()
    assert ("start a2" in log) == bool(max_queue)  # the queued one ran once a slot of A's was freed
    assert admission.statistics().running == 0 and not admission._holding  # nothing leaked


async def test_leaving_the_queue_under_a_tenant_limit_leaks_no_slot(autojump_clock):
    """Under a tenant limit, waiters that time out, are cancelled or are displaced give everything back:
    at the end nothing runs, nothing is held, and the other tenant was served throughout."""
    admission = Admission(max_concurrency=2, max_queue=3, tenant_limit=1)
    release = trio.Event()
    log: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_hold_as, admission, release, log, "A", "a0")  # runs (A's one slot)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(Rejected, match="deadline"):  # queued behind A's limit until its deadline
            await admission.acquire(trio.current_time() + 0.5, "A")
        with trio.CancelScope() as cancelled:  # queued, then its caller goes away
            async with trio.open_nursery() as leaving:
                leaving.start_soon(_hold_as, admission, release, log, "A", "a1")
                await trio.testing.wait_all_tasks_blocked()
                cancelled.cancel()
        for name in ("a2", "a3", "a4"):  # fill the queue; B's arrival displaces A's newest
            nursery.start_soon(_hold_as, admission, release, log, "A", name)
            await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(_hold_as, admission, release, log, "B", "b0")
        await trio.testing.wait_all_tasks_blocked()
        assert "start b0" in log  # a free slot, and B below its limit: it never waited behind A
        release.set()
    assert admission.statistics().running == 0 and admission.statistics().queued == 0
    assert not admission._holding and not admission._queues and not admission._finish


def test_a_principal_weight_must_be_positive_and_bounded():
    """A weight of 0, below it, NaN or huge is refused where it is made, before the fair queue divides."""
    from runtime import Principal

    for weight in (0.0, -1.0, float("nan"), 1e6):
        with pytest.raises(ValueError, match="weight"):
            Principal("s", "t", weight=weight)
