"""The connection writer (transports/_writer.py), on a real socket pair: what goes straight to the socket
and what waits to be coalesced by the writer task."""

from __future__ import annotations

import trio
import trio.testing

from transports._writer import QUIET, FrameWriter


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
                nursery.start_soon(writer.run, lambda: None)
                assert await peer.receive_some() == b"burst"  # the writer sends what was queued
                await writer.write(b"quiet")  # after a quiet spell, with the writer idle: straight through
                assert await peer.receive_some() == b"quiet"
                nursery.cancel_scope.cancel()
