"""Baselines for scripts/bench_http.py: a bare ASGI app doing the mocker's work, served two ways.

The app answers ``POST /v1/echo`` with its JSON body and ``POST /v1/generate`` with Server-Sent Events,
one ASGI body message per token (what a plain ASGI app does; ``itl_ms`` apart, as the mocker's), then
the same end event as the runtime.
``POST /v1/chat``, for scripts/bench_duplex.py, is an exchange: each NDJSON line of the body is answered
as it arrives, as the mocker's ``chat`` answers it (one NDJSON line per token, one body message each),
and the end of the body ends the answer. The app uses no event-loop API but a sleep (through sniffio),
so it runs unchanged under hypercorn's trio worker and under uvicorn (asyncio). Each server prints a
``worker.ready`` JSON line with its address, as ``ingress serve`` does.

    python scripts/bench_http_baselines.py hypercorn-trio
    python scripts/bench_http_baselines.py uvicorn
"""

from __future__ import annotations

import json
import sys
from typing import Any

import sniffio


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/v1/chat":
        await chat(receive, send)
        return
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    request = json.loads(body) if body else {}
    if scope["path"] == "/v1/echo":
        answer = json.dumps(request).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})
        return
    count, gap = request.get("max_tokens", 16), request.get("itl_ms", 0) / 1000
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    )
    for index in range(count):
        if gap and index:
            await _sleep(gap)
        chunk = json.dumps({"index": index, "token": f"tok{index}"}, separators=(",", ":")).encode()
        await send({"type": "http.response.body", "body": b"data: " + chunk + b"\n\n", "more_body": True})
    end = b'event: end\ndata: {"chunks":%d}\n\n' % count
    await send({"type": "http.response.body", "body": end, "more_body": False})


async def chat(receive: Any, send: Any) -> None:
    """Answer each body line while the body still streams in; an ``http.disconnect`` ends it too."""
    headers = [(b"content-type", b"application/x-ndjson")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    pending, turn, more = b"", 0, True
    while more:
        message = await receive()
        more = message.get("more_body", False)
        *lines, pending = (pending + message.get("body", b"")).split(b"\n")
        for line in filter(bytes.strip, lines):
            for index in range(json.loads(line).get("max_tokens", 4)):
                answer = {"turn": turn, "index": index, "token": f"tok{index}"}
                body = json.dumps(answer, separators=(",", ":")).encode() + b"\n"
                await send({"type": "http.response.body", "body": body, "more_body": True})
            turn += 1
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _sleep(seconds: float) -> None:
    """The running loop's sleep: the one place the app needs an event-loop API (``itl_ms``)."""
    if sniffio.current_async_library() == "trio":
        import trio

        await trio.sleep(seconds)
    else:
        import asyncio

        await asyncio.sleep(seconds)


def announce(host: str, port: int) -> None:
    print(json.dumps({"event": "worker.ready", "addresses": {"http": f"{host}:{port}"}}), flush=True)


def run_hypercorn_trio() -> None:
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(lambda task_status: serve(app, config, task_status=task_status))  # type: ignore[arg-type]
            host, port = binds[0].removeprefix("http://").rsplit(":", 1)
            announce(host, int(port))

    trio.run(main)


def run_uvicorn() -> None:
    import asyncio

    import uvicorn

    async def main() -> None:
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        )
        task = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110 -- uvicorn exposes only this flag, no event to wait on
            await asyncio.sleep(0.01)
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        announce(host, port)
        await task

    asyncio.run(main())


if __name__ == "__main__":
    {"hypercorn-trio": run_hypercorn_trio, "uvicorn": run_uvicorn}[sys.argv[1]]()
