"""The TCP baseline for scripts/bench_duplex.py: a minimal raw Trio server answering exchange messages.

Protocol: each frame is a u32 big-endian payload length, a u32 exchange id and the payload. A client runs
any number of exchanges on one connection at once. A non-empty payload is one JSON message
``{"max_tokens": n}`` (default 4), answered at once by n frames ``{"turn": k, "index": i, "token":
"tok<i>"}`` on the same exchange id (k counts that exchange's messages), one ``send_all`` each: the shape
of the mocker's ``chat`` answers. An empty payload is the client's half-close, answered by an empty
frame (the end of that exchange). One task per connection reads and answers in turn, so a client that
stops reading is held back by TCP's own flow control. SIGTERM stops it at once.

    python scripts/bench_raw_duplex_server.py [PORT]
"""

from __future__ import annotations

import json
import signal
import struct
import sys

import trio

HEADER = struct.Struct("!II")


def frame(exchange: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), exchange) + payload


def answer(turn: int, index: int) -> bytes:
    return json.dumps({"turn": turn, "index": index, "token": f"tok{index}"}, separators=(",", ":")).encode()


def complete_frames(buffer: bytearray) -> tuple[list[tuple[int, bytes]], int]:
    """The whole frames at the start of ``buffer`` and how many bytes they take. Parsed by offset and
    cut once per read: cutting each frame off the front would move the rest of the buffer every time."""
    frames, offset = [], 0
    while len(buffer) - offset >= HEADER.size:
        length, exchange = HEADER.unpack_from(buffer, offset)
        end = offset + HEADER.size + length
        if len(buffer) < end:
            break
        frames.append((exchange, bytes(buffer[offset + HEADER.size : end])))
        offset = end
    return frames, offset


async def serve_connection(stream: trio.SocketStream) -> None:
    buffer = bytearray()
    turns: dict[int, int] = {}  # messages answered so far, per open exchange
    try:
        while data := await stream.receive_some(65536):
            buffer += data
            frames, used = complete_frames(buffer)
            del buffer[:used]
            for exchange, payload in frames:
                if not payload:
                    turns.pop(exchange, None)
                    await stream.send_all(frame(exchange, b""))
                    continue
                turn = turns.get(exchange, 0)
                turns[exchange] = turn + 1
                for index in range(json.loads(payload).get("max_tokens", 4)):
                    await stream.send_all(frame(exchange, answer(turn, index)))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away
    finally:
        await trio.aclose_forcefully(stream)


async def stop_on_sigterm(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()


async def serve(port: int) -> None:
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    # The same announcement as `ingress serve`, so one helper (runtime.testing.spawn_process) runs both.
    print(json.dumps({"event": "worker.ready", "addresses": {"tcp": f"127.0.0.1:{port}"}}), flush=True)
    await trio.serve_listeners(serve_connection, listeners)


async def main(port: int) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_sigterm, nursery.cancel_scope)
        await serve(port)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 0)
