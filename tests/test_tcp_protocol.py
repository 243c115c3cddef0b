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
        "!HII", 4, 4096, 7
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
    assert not client.open_streams and not server.open_streams
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
            b"TINGRESS" + struct.pack("!IBI", 10, 0, 0) + struct.pack("!HII", 0, 4096, 1),
            "unsupported protocol version 0",
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
    with pytest.raises(RemoteProtocolError, match="never opened"):
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


def _versioned_pair(client_version: int) -> tuple[codec.Connection, codec.Connection]:
    client = codec.Connection(Role.CLIENT)
    client.local_hello = Hello(
        client_version, client.local_hello.max_frame_size, client.local_hello.max_streams
    )
    server = codec.Connection(Role.SERVER)
    server.receive_data(client.send(client.local_hello))
    _events(server)
    client.receive_data(server.send(server.local_hello))
    _events(client)
    return client, server


@pytest.mark.parametrize(("client_version", "agreed"), [(1, 1), (2, 2), (3, 3), (4, 4), (9, 4)])
def test_both_sides_use_the_lower_of_the_versions_they_announce(client_version, agreed):
    """HELLO carries each side's highest version; a version-1 client is still served, at version 1."""
    client, server = _versioned_pair(client_version)
    assert client.version == server.version == agreed


def test_an_exchange_round_trips_client_data_end_and_window_updates():
    """Version 2: the server grants credit, the client sends within it and half-closes; the server ends."""
    client, server = _pair()
    server.receive_data(client.send(Request(1, "chat", "", 0, (), b"")))
    _events(server)
    client.receive_data(server.send(codec.WindowUpdate(1, 10)))
    assert _events(client) == [codec.WindowUpdate(1, 10)] and client.credit[1] == 10
    server.receive_data(client.send(Data(1, b'{"a":1}')) + client.send(End(1)))
    assert _events(server) == [Data(1, b'{"a":1}'), End(1)]
    assert client.credit[1] == server.credit[1] == 3  # both sides count the credit the same way
    client.receive_data(server.send(Data(1, b"[1]")) + server.send(End(1)))
    assert _events(client) == [Data(1, b"[1]"), End(1)] and 1 not in client.open_streams


def test_client_data_past_its_credit_or_after_its_end_is_refused_on_both_sides():
    """Flow control and half-close are enforced where the frame is made and where it arrives."""
    client, server = _pair()
    server.receive_data(client.send(Request(1, "chat", "", 0, (), b"")))
    _events(server)
    client.receive_data(server.send(codec.WindowUpdate(1, 4)))
    _events(client)
    with pytest.raises(LocalProtocolError, match="credit"):
        client.send(Data(1, b"12345"))
    server.receive_data(codec.HEADER.pack(5, codec.FrameType.DATA, 1) + b"12345")  # a client that cheats
    with pytest.raises(RemoteProtocolError, match="flow control"):
        _events(server)
    client2, server2 = _pair()
    server2.receive_data(client2.send(Request(1, "chat", "", 0, (), b"")) + client2.send(End(1)))
    _events(server2)
    with pytest.raises(LocalProtocolError, match="after this client's END"):
        client2.send(End(1))
    server2.receive_data(codec.HEADER.pack(0, codec.FrameType.END, 1))
    with pytest.raises(RemoteProtocolError, match="after the client's END"):
        _events(server2)


def test_a_version_1_peer_may_not_use_exchange_frames():
    """At version 1 a client's DATA is a protocol error and no WINDOW_UPDATE is sent."""
    client, server = _versioned_pair(1)
    server.receive_data(client.send(Request(1, "chat", "", 0, (), b"")))
    _events(server)
    with pytest.raises(LocalProtocolError, match="version 2"):
        server.send(codec.WindowUpdate(1, 10))
    server.receive_data(codec.HEADER.pack(1, codec.FrameType.DATA, 1) + b"x")
    with pytest.raises(RemoteProtocolError, match="version 2"):
        _events(server)


@given(
    messages=st.lists(st.binary(min_size=0, max_size=40), max_size=20),
    window=st.integers(min_value=40, max_value=200),
    split=st.integers(min_value=1, max_value=17),
)
@settings(max_examples=60, deadline=None)
def test_any_exchange_within_its_window_arrives_intact_however_the_bytes_are_split(messages, window, split):
    """Messages sent within credit (returned as they arrive) arrive in order, however the bytes are split."""
    client, server = _pair()
    server.receive_data(client.send(Request(1, "chat", "", 0, (), b"")))
    _events(server)
    client.receive_data(server.send(codec.WindowUpdate(1, window)))
    _events(client)
    received: list[bytes] = []
    for message in messages:
        wire = client.send(Data(1, message))
        for i in range(0, len(wire), split):
            server.receive_data(wire[i : i + split])
            for event in _events(server):
                assert isinstance(event, Data)
                received.append(event.payload)
                if event.payload:  # the handler took it: the credit goes back
                    client.receive_data(server.send(codec.WindowUpdate(1, len(event.payload))))
                    _events(client)
    assert received == messages and client.credit[1] == server.credit[1] == window


def test_the_exchange_example_in_the_protocol_doc_is_exact():
    """The version-2 exchange example in docs/protocol-tcp.md is byte for byte what the codec sends."""
    import pathlib
    import re

    doc = (pathlib.Path(__file__).parent.parent / "docs" / "protocol-tcp.md").read_text()
    example = doc.split("## Exchanges (version 2)", 1)[1].split("```")[1]
    documented = bytes.fromhex(
        "".join(re.findall(r"^\s*([0-9A-F ]+?)\s{2,}", example, re.M)).replace(" ", "")
    )
    client, server = _pair()
    request = client.send(Request(1, "chat", "", 0, (), b'{"max_tokens":1}'))
    server.receive_data(request)
    _events(server)
    grant = server.send(codec.WindowUpdate(1, 65536 - 16))
    client.receive_data(grant)
    _events(client)
    rest = client.send(Data(1, b'{"max_tokens":2}')) + client.send(End(1))
    assert documented == request + grant + rest


def test_answer_credit_is_enforced_on_both_sides_from_version_3():
    """Each stream opens with twice the client's max_frame_size of answer credit; DATA past it is
    refused where it is made and where it arrives; the client's WINDOW_UPDATE gives more."""
    client, server = _pair(max_frame_size=1024)
    server.receive_data(client.send(Request(1, "generate", "", 0, (), b"")))
    _events(server)
    assert client.answer_credit[1] == server.answer_credit[1] == 2048
    client.receive_data(server.send(Data(1, b"x" * 1000)) + server.send(Data(1, b"x" * 1000)))
    assert _events(client) == [Data(1, b"x" * 1000)] * 2
    with pytest.raises(LocalProtocolError, match="answer credit"):
        server.send(Data(1, b"y" * 49))
    client.receive_data(codec.HEADER.pack(49, codec.FrameType.DATA, 1) + b"y" * 49)  # a server that cheats
    with pytest.raises(RemoteProtocolError, match="answer credit"):
        _events(client)
    client2, server2 = _pair(max_frame_size=1024)
    server2.receive_data(client2.send(Request(1, "generate", "", 0, (), b"")))
    _events(server2)
    client2.receive_data(server2.send(Data(1, b"x" * 1000)) + server2.send(Data(1, b"x" * 1000)))
    _events(client2)
    server2.receive_data(client2.send(codec.WindowUpdate(1, 2000)))
    assert _events(server2) == [codec.WindowUpdate(1, 2000)]
    client2.receive_data(server2.send(Data(1, b"y" * 1024)) + server2.send(Data(1, b"y" * 1024)))
    assert _events(client2) == [Data(1, b"y" * 1024)] * 2 and client2.answer_credit[1] == 0


@pytest.mark.parametrize("version", [1, 2])
def test_below_version_3_answers_have_no_credit_and_a_client_sends_no_window_update(version):
    """Versions 1 and 2: the server's DATA is not counted, and a client's WINDOW_UPDATE is refused."""
    client, server = _versioned_pair(version)
    server.receive_data(client.send(Request(1, "generate", "", 0, (), b"")))
    _events(server)
    client.receive_data(b"".join(server.send(Data(1, b"x" * 60000)) for _ in range(40)))  # 2.4 MB
    assert len(_events(client)) == 40 and not client.answer_credit and not server.answer_credit
    with pytest.raises(LocalProtocolError, match="version 3"):
        client.send(codec.WindowUpdate(1, 10))
    server.receive_data(codec.HEADER.pack(4, codec.FrameType.WINDOW_UPDATE, 1) + struct.pack("!I", 10))
    with pytest.raises(RemoteProtocolError, match="version 3"):
        _events(server)


@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["data", "update"]), st.integers(min_value=0, max_value=3000)), max_size=40
    ),
    window=st.integers(min_value=1024, max_value=4096),
    split=st.integers(min_value=1, max_value=23),
)
@settings(max_examples=80, deadline=None)
def test_any_interleaving_of_answers_and_credit_keeps_both_sides_in_step(steps, window, split):
    """The server may send exactly while the credit lasts, however DATA and WINDOW_UPDATE interleave
    and however the bytes are split; both sides always agree on what is left."""
    client, server = _pair(max_frame_size=window)
    server.receive_data(client.send(Request(1, "generate", "", 0, (), b"")))
    _events(server)
    sent = granted = 0
    for kind, size in steps:
        if kind == "update":
            if size == 0:
                continue
            wire = client.send(codec.WindowUpdate(1, size))
            receiver = server
            granted += size
        else:
            size = min(size, window)  # a frame never exceeds the client's limit
            if server.answer_credit[1] < size:
                with pytest.raises(LocalProtocolError, match="answer credit"):
                    server.send(Data(1, b"z" * size))
                continue
            wire = server.send(Data(1, b"z" * size))
            receiver = client
            sent += size
        for i in range(0, len(wire), split):
            receiver.receive_data(wire[i : i + split])
            _events(receiver)
        assert client.answer_credit[1] == server.answer_credit[1] == 2 * window + granted - sent >= 0
