"""The connection writer (transports/_writer.py), on a real socket pair: what goes straight to the socket
and what waits to be coalesced by the writer task."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from transports._writer import QUIET, FrameWriter, WriterClosed


async def _pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    left, right = trio.socket.socketpair()
    return trio.SocketStream(left), trio.SocketStream(right)


async def test_a_frame_after_a_quiet_spell_goes_straight_to_the_socket(autojump_clock):
    """With the writer task not even running, a first frame and one after QUIET reach the peer at once;
    one right behind another waits for the writer (to be coalesced with what follows)."""
    with trio.fail_after(5):  # virtual seconds: a frame that never arrives fails, not hangs
        ours, peer = await _pair()
        async with ours, peer:
            writer = FrameWriter(ours, high_water=65536)
            await writer.write(b"first")
            assert await peer.receive_some() == b"first"
            await writer.write(b"burst")  # no time has passed: part of a burst, queued for the writer
            await trio.sleep(QUIET)
            with trio.move_on_after(1):  # nothing arrives: the writer task is not running
                early = await peer.receive_some()
                raise AssertionError(f"{early!r} was sent without the writer task")
            await trio.sleep(QUIET)
            async with trio.open_nursery() as nursery:
                writer.start(nursery, lambda: None)
                assert await peer.receive_some() == b"burst"  # the writer sends what was queued
                await writer.write(b"quiet")  # after a quiet spell, with the writer idle: straight through
                assert await peer.receive_some() == b"quiet"
                nursery.cancel_scope.cancel()


async def test_the_writer_task_runs_only_while_something_is_queued():
    """A burst starts a writer task that sends it and ends: an idle connection holds no task."""
    with trio.fail_after(5):
        ours, peer = await _pair()
        async with ours, peer, trio.open_nursery() as nursery:
            writer = FrameWriter(ours, high_water=65536)
            writer.start(nursery, lambda: None)
            await trio.testing.wait_all_tasks_blocked()
            assert not nursery.child_tasks  # started, yet nothing to write: no task
            writer.write_nowait(b"one")
            writer.write_nowait(b"two")
            assert len(nursery.child_tasks) == 1
            assert await peer.receive_some() == b"onetwo"  # coalesced into one write
            await trio.testing.wait_all_tasks_blocked()
            assert not nursery.child_tasks
            writer.write_nowait(b"three")  # and again when something is queued
            assert await peer.receive_some() == b"three"


async def test_finish_sends_what_is_queued_then_sets_done():
    """finish() flushes the queue and sets done; later writes are refused with WriterClosed."""
    with trio.fail_after(5):
        ours, peer = await _pair()
        async with ours, peer, trio.open_nursery() as nursery:
            writer = FrameWriter(ours, high_water=65536)
            writer.write_nowait(b"queued before start")
            writer.start(nursery, lambda: None)
            writer.finish()
            await writer.done.wait()
            assert await peer.receive_some() == b"queued before start"
            with pytest.raises(WriterClosed):
                writer.write_nowait(b"too late")


async def test_a_write_once_the_connection_nursery_closed_is_dropped_and_closes_the_writer():
    """Queuing on a connection whose nursery is gone drops the frame (a cleanup may be what wrote it)
    and closes the writer: the next write raises WriterClosed (a caller gone), never a crash."""
    ours, peer = await _pair()
    async with ours, peer:
        writer = FrameWriter(ours, high_water=65536)
        async with trio.open_nursery() as nursery:
            writer.start(nursery, lambda: None)
        writer.write_nowait(b"after the connection ended")
        assert writer.closed and writer.done.is_set()
        with pytest.raises(WriterClosed):
            writer.write_nowait(b"and again")


async def test_a_peer_that_is_gone_calls_on_broken_and_closes_the_writer():
    """send_all failing (the peer closed its end) closes the writer and tells the connection, once."""
    broken: list[bool] = []
    ours, peer = await _pair()  # a Unix socket pair: writing to a closed peer fails at once (EPIPE)
    await peer.aclose()
    async with ours, trio.open_nursery() as nursery:
        writer = FrameWriter(ours, high_water=65536)
        writer.start(nursery, lambda: broken.append(True))
        writer.write_nowait(b"to nobody")
        with trio.fail_after(5):
            await writer.done.wait()
    assert broken == [True] and writer.closed
