"""The TCP wire codec, with no sockets: paired state machines, exact bytes, and Hypothesis fuzzing."""

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transports.tcp import _protocol as codec
from transports.tcp._protocol import (
    NEED_DATA,
    ConnectionClosed,
    Data,
    End,
    Error,
    GoAway,
    Hello,
    Kill,
    LocalProtocolError,
    RemoteProtocolError,
    Request,
    Role,
    Stop,
)


def _pair(max_frame_size: int = codec.DEFAULT_MAX_FRAME_SIZE) -> tuple[codec.Connection, codec.Connection]:
    client = codec.Connection(Role.CLIENT, max_frame_size=max_frame_size)
    server = codec.Connection(Role.SERVER, max_frame_size=max_frame_size)
    server.receive_data(client.send(client.local_hello))
    assert isinstance(server.next_event(), Hello)
    client.receive_data(server.send(server.local_hello))
    assert isinstance(client.next_event(), Hello)
    return client, server


def _events(conn: codec.Connection) -> list[object]:
    out = []
    while (event := conn.next_event()) is not NEED_DATA:
        out.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return out


def test_preface_and_hello_bytes_are_exactly_as_documented():
    """The preface is the magic followed by a 10-byte HELLO frame on stream 0 (docs/protocol-tcp.md)."""
    client = codec.Connection(Role.CLIENT, max_frame_size=4096, max_streams=7)
    assert client.send(client.local_hello) == b"TINGRESS" + struct.pack("!IBI", 10, 0, 0) + struct.pack(
        "!HII", 1, 4096, 7
    )


def test_a_whole_exchange_round_trips_through_paired_machines():
    """Request, data, end, stop, kill, error and goaway arrive as sent, byte-split anywhere."""
    client, server = _pair()
    request = Request(1, "generate", "r-1", 2500, (("auth", "token"),), b'{"max_tokens": 2}')
    wire = client.send(request) + client.send(Stop(1))
    for i in range(len(wire)):  # one byte at a time: framing must not depend on read sizes
        server.receive_data(wire[i : i + 1])
    assert _events(server) == [request, Stop(1)]
    replies = [Data(1, b"a"), Data(1, b"b"), End(1)]
    client.receive_data(b"".join(server.send(e) for e in replies))
    assert _events(client) == replies
    assert client.open_streams == set() == server.open_streams
    client.receive_data(server.send(GoAway(1, "draining")))
    assert _events(client) == [GoAway(1, "draining")] and client.goaway_received is not None


def test_frames_on_a_finished_stream_are_dropped_not_errors():
    """A KILL that crossed the server's END on the wire is ignored, as is one the client sends late."""
    client, server = _pair()
    server.receive_data(client.send(Request(1, "e", "", 0, (), b"")))
    _events(server)
    client.receive_data(server.send(End(1)))
    _events(client)
    assert client.send(Kill(1)) == b""  # already ended on the client side: nothing to send
    server.receive_data(codec.HEADER.pack(0, codec.FrameType.KILL, 1))  # one that was already in flight
    assert _events(server) == []


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"GET / HTTP/1.1\r\n", "bad preface"),
        (
            b"TINGRESS" + struct.pack("!IBI", 10, 0, 0) + struct.pack("!HII", 9, 4096, 1),
            "unsupported protocol version 9",
        ),
        (b"TINGRESS" + struct.pack("!IBI", 5000, 0, 0), "exceeds the limit"),
        (b"TINGRESS" + struct.pack("!IBI", 0, 2, 1), "expected HELLO first"),
    ],
)
def test_bad_handshakes_are_remote_protocol_errors(wire, message):
    """A peer that is not ours, or speaks another version, gets a protocol error that says why."""
    server = codec.Connection(Role.SERVER)
    server.receive_data(wire)
    with pytest.raises(RemoteProtocolError, match=message):
        _events(server)


def test_oversized_frame_is_refused_before_it_is_buffered():
    """A frame header announcing more than max_frame_size fails at once, before the payload arrives."""
    _, server = _pair(max_frame_size=2048)
    server.receive_data(codec.HEADER.pack(4096, codec.FrameType.REQUEST, 1))
    with pytest.raises(RemoteProtocolError, match="4096 bytes exceeds the limit of 2048"):
        server.next_event()


def test_stream_ids_must_increase_and_roles_are_enforced():
    """Reusing a stream id, or a client sending DATA, is a protocol violation."""
    client, server = _pair()
    server.receive_data(client.send(Request(5, "e", "", 0, (), b"")))
    _events(server)
    stale = codec.Connection(Role.CLIENT)
    stale.peer_hello = client.peer_hello  # a client that forgot which ids it used
    server.receive_data(stale.send(Request(4, "e", "", 0, (), b"")))
    with pytest.raises(RemoteProtocolError, match="REQUEST is not allowed on a closed stream"):
        _events(server)
    _, server2 = _pair()
    server2.receive_data(codec.HEADER.pack(1, codec.FrameType.DATA, 1) + b"x")
    with pytest.raises(RemoteProtocolError, match="a client may not send DATA"):
        _events(server2)


def test_local_misuse_raises_local_protocol_error():
    """Sending DATA on a stream that is not open, or before the handshake, is our own bug."""
    _, server = _pair()
    with pytest.raises(LocalProtocolError):
        server.send(Data(9, b"x"))
    fresh = codec.Connection(Role.SERVER)
    with pytest.raises(LocalProtocolError):
        fresh.send(End(1))


def test_eof_mid_frame_is_an_error_and_between_frames_is_a_clean_close():
    """The peer closing between frames is ConnectionClosed; closing inside a frame is a protocol error."""
    client, server = _pair()
    server.receive_data(b"")
    assert _events(server) == [ConnectionClosed()]
    client, server = _pair()
    server.receive_data(client.send(Request(1, "e", "", 0, (), b"xyz"))[:-1])
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        _events(server)


_text = st.text(max_size=20)
_requests = st.builds(
    Request,
    stream_id=st.just(0),
    endpoint=_text,
    request_id=_text,
    timeout_ms=st.integers(0, 2**32 - 1),
    metadata=st.lists(st.tuples(_text, _text), max_size=4).map(tuple),
    payload=st.binary(max_size=200),
)


@given(
    requests=st.lists(_requests, min_size=1, max_size=5),
    chunks=st.lists(st.binary(max_size=100), max_size=5),
    code=st.integers(0, 65535),
    retryable=st.booleans(),
    message=_text,
    split=st.integers(1, 50),
)
@settings(max_examples=200, deadline=None)
def test_any_frames_round_trip(requests, chunks, code, retryable, message, split):
    """Any sequence of well-formed frames, cut into any read sizes, decodes to exactly what was sent."""
    client, server = _pair()
    sent = [
        Request(i + 1, r.endpoint, r.request_id, r.timeout_ms, r.metadata, r.payload)
        for i, r in enumerate(requests)
    ]
    wire = b"".join(client.send(r) for r in sent)
    for i in range(0, len(wire), split):
        server.receive_data(wire[i : i + split])
    assert _events(server) == sent
    replies = [Data(1, c) for c in chunks] + [Error(1, code, retryable, message)]
    client.receive_data(b"".join(server.send(e) for e in replies))
    assert _events(client) == replies


@given(garbage=st.binary(max_size=300), after_handshake=st.booleans())
@settings(max_examples=500, deadline=None)
def test_arbitrary_bytes_never_raise_anything_but_remote_protocol_error(garbage, after_handshake):
    """Whatever bytes arrive, the codec decodes them or raises RemoteProtocolError, never anything else."""
    if after_handshake:
        _, server = _pair()
    else:
        server = codec.Connection(Role.SERVER)
        garbage = b"TINGRESS" + garbage
    server.receive_data(garbage)
    server.receive_data(b"")
    with contextlib.suppress(RemoteProtocolError):
        _events(server)


def test_the_worked_example_in_the_protocol_doc_is_exact():
    """The hex example in docs/protocol-tcp.md is byte for byte what the codec sends."""
    import pathlib
    import re

    doc = (pathlib.Path(__file__).parent.parent / "docs" / "protocol-tcp.md").read_text()
    example = doc.split("## Example", 1)[1].split("```")[1]
    documented = bytes.fromhex(
        "".join(re.findall(r"^\s*([0-9A-F ]+?)\s{2,}", example, re.M)).replace(" ", "")
    )
    client = codec.Connection(Role.CLIENT)
    hello = client.send(client.local_hello)
    client.peer_hello = client.local_hello  # as if the server had answered
    request = client.send(Request(1, "generate", "", 0, (), b'{"max_tokens":2}'))
    assert documented == hello + request


def test_a_connection_closed_before_sending_anything_is_a_clean_close():
    """Connect-and-close (a TCP health check) is ConnectionClosed; a partial preface is still an error."""
    server = codec.Connection(Role.SERVER)
    server.receive_data(b"")
    assert _events(server) == [ConnectionClosed()]
    partial = codec.Connection(Role.SERVER)
    partial.receive_data(codec.MAGIC[:3])
    partial.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        _events(partial)
