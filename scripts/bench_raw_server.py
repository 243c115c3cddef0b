"""The baseline for scripts/bench_tcp.py: a minimal raw Trio server doing the mocker's work.

Protocol: each frame is a u32 big-endian length and a JSON payload. The client sends one request frame
``{"op": "generate" | "echo", ...}`` at a time per connection; the server answers ``echo`` with one frame and
``generate`` with ``max_tokens`` frames (one ``send_all`` each, no coalescing) and then an empty frame.
While streaming it watches for the client's EOF and cancels the stream, printing a JSON line with the wall
time, so disconnect latency can be compared. SIGTERM stops it at once (it has no drain).

    python scripts/bench_raw_server.py PORT
"""

from __future__ import annotations

import json
import signal
import struct
import sys
import time

import trio

_LENGTH = struct.Struct("!I")
END_FRAME = _LENGTH.pack(0)


def frame(payload: bytes) -> bytes:
    return _LENGTH.pack(len(payload)) + payload


class FrameReader:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    def unread(self, payload: bytes) -> None:
        """Put a frame back: the next ``read`` returns it first."""
        self.buffer[:0] = frame(payload)

    async def read(self) -> bytes | None:
        while True:
            if len(self.buffer) >= 4:
                (length,) = _LENGTH.unpack_from(self.buffer)
                if len(self.buffer) >= 4 + length:
                    payload = bytes(self.buffer[4 : 4 + length])
                    del self.buffer[: 4 + length]
                    return payload
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return None  # reset by the client: the same as a close, for this server
            if not data:
                return None
            self.buffer += data


async def generate(stream: trio.SocketStream, request: dict) -> None:
    itl = request.get("itl_ms", 0) / 1000
    for index in range(request.get("max_tokens", 16)):
        if index and itl:
            await trio.sleep(itl)
        chunk = json.dumps({"index": index, "token": f"tok{index}"}, separators=(",", ":")).encode()
        await stream.send_all(frame(chunk))
    await stream.send_all(END_FRAME)


async def stream_until_eof(stream: trio.SocketStream, reader: FrameReader, request: dict) -> None:
    async with trio.open_nursery() as nursery:

        async def watch_eof() -> None:
            payload = await reader.read()
            if payload is None:
                nursery.cancel_scope.cancel()
                print(json.dumps({"event": "cancelled", "timestamp": time.time()}), flush=True)
            else:
                # The client's next request, sent as soon as our END reached it: the connection's
                # loop must still see it (taking it here lost it, and hung that connection).
                reader.unread(payload)

        nursery.start_soon(watch_eof)
        await generate(stream, request)
        nursery.cancel_scope.cancel()


async def serve_connection(stream: trio.SocketStream) -> None:
    reader = FrameReader(stream)
    try:
        while (payload := await reader.read()) is not None:
            request = json.loads(payload)
            if request["op"] == "echo":
                await stream.send_all(frame(json.dumps(request.get("body")).encode()))
            else:
                await stream_until_eof(stream, reader, request)
    except* (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away; errors inside a stream's nursery arrive grouped
    finally:
        await trio.aclose_forcefully(stream)


async def stop_on_sigterm(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()


async def main(port: int) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_sigterm, nursery.cancel_scope)
        await serve(port)


async def serve(port: int) -> None:
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    # The same announcement as `ingress serve`, so one helper (runtime.testing.spawn_process) runs both.
    print(json.dumps({"event": "worker.ready", "addresses": {"tcp": f"127.0.0.1:{port}"}}), flush=True)
    await trio.serve_listeners(serve_connection, listeners)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 0)
