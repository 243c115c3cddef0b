"""The trio-ingress TCP wire protocol, sans-IO: bytes in, events out; events in, bytes out.

No sockets and no trio here (h11 and h2 are the model): ``Connection.receive_data(bytes)`` feeds it,
``next_event()`` returns the next event or ``NEED_DATA``, ``send(event)`` returns the bytes to write.
The full specification is docs/protocol-tcp.md; in short:

    preface   = b"TINGRESS" then a HELLO frame, sent by each side first
    frame     = u32 payload_length | u8 type | u32 stream_id | payload      (big endian)

Streams are opened by the client's REQUEST with strictly increasing ids and closed by the server's END
or ERROR; the allowed (frame, stream state) pairs are the transition table ``_TRANSITIONS``. Frames for
an already closed stream are dropped, because STOP/KILL and END legitimately cross on the wire.

Version 2 (negotiated: each HELLO carries the highest version its sender speaks, and both use the lower)
adds exchanges: on an open stream the client may send DATA (a message) within the credit the server
granted for that stream with WINDOW_UPDATE, and END (its half-close); the stream stays open until the
server's END or ERROR.

Version 3 adds credit for the answers: each stream opens with an answer window of twice the client's
``max_frame_size``, the server's DATA must fit what is left of it, and the client returns what its
application consumed with WINDOW_UPDATE. A client that does not read one stream holds back that
stream's handler only, never its siblings on the connection.

Version 4 adds the heartbeat: either side may send PING (8 opaque bytes) on stream 0 and the other
answers PONG with the same bytes; the worker's PONG also carries its load report (JSON), so a router
reads a worker's load where it already has a connection, and a peer whose process hangs while its
kernel still acknowledges TCP is found.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

MAGIC: Final = b"TINGRESS"
# The highest version this side speaks; a peer announcing any version from 1 up is served at the lower.
PROTOCOL_VERSION: Final = 4
# The first version with exchanges (client DATA and END, WINDOW_UPDATE).
EXCHANGES_VERSION: Final = 2
# The first version with per-stream credit for the server's DATA (WINDOW_UPDATE from the client).
ANSWER_CREDIT_VERSION: Final = 3
# The first version with PING/PONG (the heartbeat, and the worker's load report in its PONG).
HEARTBEAT_VERSION: Final = 4
# A PING's payload, echoed by its PONG: the sender's way to match the two.
PING_OPAQUE_SIZE: Final = 8
HEADER: Final = struct.Struct("!IBI")
DEFAULT_MAX_FRAME_SIZE: Final = 1024 * 1024
DEFAULT_MAX_STREAMS: Final = 128
# The smallest frame limit a peer may announce: a REQUEST with long names and metadata must fit.
MIN_MAX_FRAME_SIZE: Final = 1024
_MAX_STREAM_ID: Final = 2**32 - 1
_HELLO = struct.Struct("!HII")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_ERROR_HEAD = struct.Struct("!HB")


class ProtocolError(Exception):
    """Root of the codec's errors. The connection cannot continue after one."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something this protocol does not allow (malformed, oversized, out of order)."""


class LocalProtocolError(ProtocolError):
    """We tried to send something this protocol does not allow: a bug in the caller of ``send``."""


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class FrameType(enum.IntEnum):
    HELLO = 0
    REQUEST = 1
    DATA = 2
    END = 3
    ERROR = 4
    STOP = 5
    KILL = 6
    GOAWAY = 7
    WINDOW_UPDATE = 8  # version 2 (from the server); version 3 (from the client too)
    PING = 9  # version 4, either side, stream 0
    PONG = 10  # version 4, either side, stream 0


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    max_frame_size: int
    max_streams: int


@dataclass(frozen=True, slots=True)
class Request:
    stream_id: int
    endpoint: str
    request_id: str
    timeout_ms: int  # 0 means "no deadline"
    metadata: tuple[tuple[str, str], ...]
    payload: bytes


@dataclass(frozen=True, slots=True)
class Data:
    stream_id: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class End:
    stream_id: int


@dataclass(frozen=True, slots=True)
class Error:
    """A stream's error (stream_id > 0) or the connection's last word before closing (stream_id 0)."""

    stream_id: int
    code: int
    retryable: bool
    message: str


@dataclass(frozen=True, slots=True)
class Stop:
    stream_id: int


@dataclass(frozen=True, slots=True)
class Kill:
    stream_id: int


@dataclass(frozen=True, slots=True)
class GoAway:
    """No stream above ``last_stream_id`` will be served on this connection: open them elsewhere."""

    last_stream_id: int
    message: str


@dataclass(frozen=True, slots=True)
class WindowUpdate:
    """The sender may receive ``increment`` more bytes of DATA on this stream (the server's, for the
    client's messages: version 2; the client's, for the answers: version 3)."""

    stream_id: int
    increment: int


@dataclass(frozen=True, slots=True)
class Ping:
    """Version 4: are you there? The peer answers PONG with the same ``opaque`` bytes."""

    opaque: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    """Version 4: the answer to a PING. From a worker, ``report`` is its load report (a JSON object,
    docs/protocol-tcp.md "Heartbeat and load report"); from a client it is empty."""

    opaque: bytes
    report: bytes = b""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the connection cleanly, between frames."""


Event = (
    Hello
    | Request
    | Data
    | End
    | Error
    | Stop
    | Kill
    | GoAway
    | WindowUpdate
    | Ping
    | Pong
    | ConnectionClosed
)


class _Stream(enum.Enum):
    NEW = "new"  # an id above every id seen so far
    OPEN = "open"
    CLOSED = "closed"  # an id at or below the highest seen, not open


# (frame type, stream state) -> state after. Pairs not listed are protocol errors, except frames on
# CLOSED streams, which are dropped (see the module docstring).
_TRANSITIONS: Final = {
    (FrameType.REQUEST, _Stream.NEW): _Stream.OPEN,
    (FrameType.DATA, _Stream.OPEN): _Stream.OPEN,
    (FrameType.STOP, _Stream.OPEN): _Stream.OPEN,
    (FrameType.KILL, _Stream.OPEN): _Stream.OPEN,
    (FrameType.END, _Stream.OPEN): _Stream.CLOSED,
    (FrameType.ERROR, _Stream.OPEN): _Stream.CLOSED,
}
_SENT_BY: Final = {
    FrameType.REQUEST: Role.CLIENT,
    FrameType.STOP: Role.CLIENT,
    FrameType.KILL: Role.CLIENT,
    FrameType.DATA: Role.SERVER,  # and, from version 2, the client's messages on an exchange
    FrameType.END: Role.SERVER,  # and, from version 2, the client's half-close
    FrameType.ERROR: Role.SERVER,  # on a stream; either side may send ERROR on stream 0
    FrameType.GOAWAY: Role.SERVER,
}
# Frames a client may send on an open stream from version 2 on (an exchange's messages, its half-close).
_CLIENT_EXCHANGE_FRAMES: Final = (FrameType.DATA, FrameType.END)


class Connection:
    """One side of one connection. ``max_frame_size`` and ``max_streams`` are what *we* accept."""

    # One per connection, and a worker holds thousands of idle ones: no per-instance dict.
    __slots__ = (
        "_buffer",
        "_eof",
        "_hello_sent",
        "_offset",
        "_preface_seen",
        "answer_credit",
        "client_ended",
        "credit",
        "goaway_received",
        "highest_stream_id",
        "local_hello",
        "open_streams",
        "peer_hello",
        "peer_role",
        "role",
        "version",
    )

    def __init__(
        self,
        role: Role,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_streams: int = DEFAULT_MAX_STREAMS,
        version: int = PROTOCOL_VERSION,
    ) -> None:
        if max_frame_size < MIN_MAX_FRAME_SIZE:
            raise ValueError(f"max_frame_size must be at least {MIN_MAX_FRAME_SIZE}")
        if not 1 <= version <= PROTOCOL_VERSION:
            raise ValueError(f"version must be from 1 to {PROTOCOL_VERSION}")
        self.role = role
        self.peer_role = Role.SERVER if role is Role.CLIENT else Role.CLIENT
        self.local_hello = Hello(version, max_frame_size, max_streams)
        self.peer_hello: Hello | None = None
        self.version = 0  # negotiated once the peer's HELLO arrived: the lower of the two
        # Dicts used as sets: an empty dict costs a quarter of an empty set, on every idle connection.
        self.open_streams: dict[int, None] = {}
        # Version 2 exchanges, per stream: bytes of client DATA still allowed (what the server granted
        # and the client has not used; kept by both sides), and the streams the client half-closed.
        self.credit: dict[int, int] = {}
        self.client_ended: dict[int, None] = {}
        # Version 3, per stream: bytes of server DATA still allowed (the answer window, less what was
        # sent, plus what the client returned; kept by both sides).
        self.answer_credit: dict[int, int] = {}
        self.highest_stream_id = 0
        self.goaway_received: GoAway | None = None
        self._buffer = bytearray()
        self._offset = 0
        self._eof = False
        self._preface_seen = False
        self._hello_sent = False

    # ---- receiving ----------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes read from the socket; ``b""`` means the peer closed its side."""
        if self._eof and data:
            raise LocalProtocolError("received data after end of stream")
        if not data:
            self._eof = True
        self._buffer += data

    def next_event(self) -> Event | _NeedData:
        """The next complete event, or NEED_DATA. Raises RemoteProtocolError on malformed input."""
        while True:
            if not self._preface_seen and not self._take_preface():
                return self._need_data()
            available = len(self._buffer) - self._offset
            if available < HEADER.size:
                return self._need_data()
            length, raw_type, stream_id = HEADER.unpack_from(self._buffer, self._offset)
            limit = self.local_hello.max_frame_size if self.peer_hello is not None else _HELLO.size
            if length > limit:
                raise RemoteProtocolError(f"frame of {length} bytes exceeds the limit of {limit} bytes")
            if available < HEADER.size + length:
                return self._need_data()
            start = self._offset + HEADER.size
            payload = bytes(self._buffer[start : start + length])
            self._consume(HEADER.size + length)
            event = self._decode(raw_type, stream_id, payload)
            if not isinstance(event, _Dropped):
                return event

    def _take_preface(self) -> bool:
        have = bytes(self._buffer[: len(MAGIC)])
        if not MAGIC.startswith(have):
            raise RemoteProtocolError("bad preface: the peer does not speak the trio-ingress TCP protocol")
        if len(have) < len(MAGIC):
            return False
        self._consume(len(MAGIC))
        self._preface_seen = True
        return True

    def _need_data(self) -> Event | _NeedData:
        if not self._eof:
            return NEED_DATA
        if len(self._buffer) > self._offset:
            raise RemoteProtocolError("connection closed in the middle of a frame")
        # Also before the preface, when nothing at all came: a TCP health check or a port scan
        # connects and closes, which is no protocol error (and must not log one per probe).
        return ConnectionClosed()

    def _consume(self, count: int) -> None:
        self._offset += count
        # Compact rarely: deleting from the front of a bytearray copies what remains.
        if self._offset > 65536 and self._offset * 2 > len(self._buffer):
            del self._buffer[: self._offset]
            self._offset = 0

    def _decode(self, raw_type: int, stream_id: int, payload: bytes) -> Event | _Dropped:
        try:
            frame_type = FrameType(raw_type)
        except ValueError:
            raise RemoteProtocolError(f"unknown frame type {raw_type}") from None
        if self.peer_hello is None and frame_type is not FrameType.HELLO:
            raise RemoteProtocolError(f"expected HELLO first, got {frame_type.name}")
        if frame_type is FrameType.HELLO:
            return self._receive_hello(stream_id, payload)
        if stream_id != 0 and frame_type in (FrameType.PING, FrameType.PONG):
            raise RemoteProtocolError(f"{frame_type.name} is only allowed on stream 0")
        if stream_id == 0:
            return self._receive_connection_frame(frame_type, payload)
        if self._client_exchange_frame(frame_type, self.peer_role):
            return self._receive_client_exchange_frame(frame_type, stream_id, payload)
        sender = _SENT_BY.get(frame_type)
        if sender is not None and sender is not self.peer_role:
            raise RemoteProtocolError(f"a {self.peer_role.value} may not send {frame_type.name}")
        event = _DECODERS[frame_type](stream_id, payload)
        if isinstance(event, WindowUpdate):
            return self._receive_window_update(event)
        if not self._advance(frame_type, stream_id, RemoteProtocolError):
            return _DROPPED
        if frame_type is FrameType.DATA and stream_id in self.answer_credit:
            self._take_answer_credit(stream_id, len(payload), RemoteProtocolError)
        return event

    def _receive_window_update(self, event: WindowUpdate) -> Event | _Dropped:
        """Credit from the peer: for the client's messages (from a server, version 2) or for the
        answers (from a client, version 3)."""
        needed = EXCHANGES_VERSION if self.peer_role is Role.SERVER else ANSWER_CREDIT_VERSION
        if self.version < needed:
            raise RemoteProtocolError(
                f"a {self.peer_role.value} may not send WINDOW_UPDATE before protocol version {needed}"
            )
        stream_id = event.stream_id
        if stream_id in self.open_streams:
            credit = self.credit if self.peer_role is Role.SERVER else self.answer_credit
            credit[stream_id] = credit.get(stream_id, 0) + event.increment
            return event
        if stream_id > self.highest_stream_id:
            raise RemoteProtocolError(f"WINDOW_UPDATE on stream {stream_id}, which was never opened")
        return _DROPPED  # the stream ended meanwhile

    def _take_answer_credit(self, stream_id: int, size: int, error: type[ProtocolError]) -> None:
        """Version 3: the server's DATA uses the stream's answer credit; past it is a protocol error."""
        available = self.answer_credit[stream_id]
        if size > available:
            raise error(
                f"flow control: {size} bytes of DATA on stream {stream_id} with {available} of answer credit"
            )
        self.answer_credit[stream_id] = available - size

    def _client_exchange_frame(self, frame_type: FrameType, sender: Role) -> bool:
        return sender is Role.CLIENT and frame_type in _CLIENT_EXCHANGE_FRAMES

    def _receive_client_exchange_frame(
        self, frame_type: FrameType, stream_id: int, payload: bytes
    ) -> Event | _Dropped:
        """The server's side of a client's DATA or END (version 2): within credit, before the half-close."""
        if self.version < EXCHANGES_VERSION:
            raise RemoteProtocolError(f"a client may not send {frame_type.name} before protocol version 2")
        if stream_id not in self.open_streams:
            if stream_id > self.highest_stream_id:
                raise RemoteProtocolError(f"{frame_type.name} on stream {stream_id}, which was never opened")
            return _DROPPED  # the server's END crossed it on the wire
        if stream_id in self.client_ended:
            raise RemoteProtocolError(f"{frame_type.name} on stream {stream_id} after the client's END")
        if frame_type is FrameType.END:
            if payload:
                raise RemoteProtocolError("END frames carry no payload")
            self.client_ended[stream_id] = None
            return End(stream_id)
        if stream_id not in self.credit:
            raise RemoteProtocolError(
                f"flow control: DATA on stream {stream_id}, which was granted no credit"
            )
        available = self.credit[stream_id]
        if len(payload) > available:
            raise RemoteProtocolError(
                f"flow control: {len(payload)} bytes of DATA on stream {stream_id} with {available} of credit"
            )
        self.credit[stream_id] = available - len(payload)
        return Data(stream_id, payload)

    def _receive_hello(self, stream_id: int, payload: bytes) -> Hello:
        if self.peer_hello is not None or stream_id != 0 or len(payload) != _HELLO.size:
            raise RemoteProtocolError("HELLO must come once, first, on stream 0, with a 10-byte payload")
        hello = Hello(*_HELLO.unpack(payload))
        if hello.version < 1:
            raise RemoteProtocolError(
                f"unsupported protocol version {hello.version}; "
                f"this side speaks versions 1 to {PROTOCOL_VERSION}"
            )
        if hello.max_frame_size < MIN_MAX_FRAME_SIZE or hello.max_streams < 1:
            raise RemoteProtocolError("HELLO announces a frame limit below 1024 bytes or no streams")
        self.peer_hello = hello
        self.version = min(hello.version, self.local_hello.version)
        if not self._hello_sent:
            # The side that answers (the server) announces the version both will use: a version-1 peer
            # checks that the HELLO it gets says 1, as it always has.
            self.local_hello = Hello(
                self.version, self.local_hello.max_frame_size, self.local_hello.max_streams
            )
        return hello

    def _receive_connection_frame(self, frame_type: FrameType, payload: bytes) -> Event:
        if frame_type is FrameType.ERROR:
            return _decode_error(0, payload)
        if frame_type in (FrameType.PING, FrameType.PONG):
            if self.version < HEARTBEAT_VERSION:
                raise RemoteProtocolError(f"{frame_type.name} is not allowed before protocol version 4")
            return _decode_heartbeat(frame_type, payload)
        if frame_type is FrameType.GOAWAY and self.peer_role is Role.SERVER:
            (last,) = _unpack(_U32, payload, 0)
            self.goaway_received = GoAway(last, _text(payload[_U32.size :]))
            return self.goaway_received
        raise RemoteProtocolError(f"{frame_type.name} is not allowed on stream 0")

    def _advance(self, frame_type: FrameType, stream_id: int, error: type[ProtocolError]) -> bool:
        """Apply the transition table; False means "closed stream, drop the frame"."""
        if stream_id in self.open_streams:
            state = _Stream.OPEN
        elif stream_id > self.highest_stream_id:
            state = _Stream.NEW
        else:
            state = _Stream.CLOSED
        after = _TRANSITIONS.get((frame_type, state))
        if after is None:
            if state is _Stream.CLOSED and frame_type is not FrameType.REQUEST:
                return False
            raise error(f"{frame_type.name} is not allowed on a {state.value} stream ({stream_id})")
        if after is _Stream.OPEN and state is _Stream.NEW:
            self.open_streams[stream_id] = None
            self.highest_stream_id = stream_id
            if self.version >= ANSWER_CREDIT_VERSION:
                self.answer_credit[stream_id] = self.answer_window
        elif after is _Stream.CLOSED:
            self.open_streams.pop(stream_id, None)
            self.credit.pop(stream_id, None)
            self.client_ended.pop(stream_id, None)
            self.answer_credit.pop(stream_id, None)
        return True

    @property
    def answer_window(self) -> int:
        """Version 3: the answer credit each stream opens with, twice the client's ``max_frame_size``: a
        client may keep up to half the window unreturned (it returns credit in halves), and any chunk
        that fits a frame still fits what is left, so none can deadlock."""
        client_hello = self.local_hello if self.role is Role.CLIENT else self.peer_hello
        assert client_hello is not None
        return 2 * client_hello.max_frame_size

    # ---- sending ------------------------------------------------------------------------------------

    def send(self, event: Event) -> bytes:
        """The bytes for ``event``; b"" for STOP/KILL on a stream that has already ended."""
        if isinstance(event, Hello):
            return self._send_hello()
        if self.peer_hello is None:
            raise LocalProtocolError("send HELLO and receive the peer's HELLO before anything else")
        if isinstance(event, Data):  # the hot path, first
            return self.send_data(event.stream_id, event.payload)
        frame_type, stream_id, payload = _encode(event)
        if self._client_exchange_frame(frame_type, self.role):
            return self._send_client_end(stream_id)
        if frame_type is FrameType.WINDOW_UPDATE:
            return self._send_window_update(stream_id, payload, event)
        if stream_id == 0:
            self._check_connection_frame(frame_type)
        else:
            self._check_sender(frame_type)
            if not self._advance(frame_type, stream_id, LocalProtocolError):
                if frame_type in (FrameType.STOP, FrameType.KILL):
                    return b""
                raise LocalProtocolError(f"{frame_type.name} on stream {stream_id}, which has ended")
        return self._frame(frame_type, stream_id, payload)

    def _check_connection_frame(self, frame_type: FrameType) -> None:
        if frame_type in (FrameType.PING, FrameType.PONG):
            if self.version < HEARTBEAT_VERSION:
                raise LocalProtocolError(f"{frame_type.name} is not allowed before protocol version 4")
        elif frame_type is not FrameType.ERROR and (
            frame_type is not FrameType.GOAWAY or self.role is not Role.SERVER
        ):
            raise LocalProtocolError(f"a {self.role.value} may not send {frame_type.name} on stream 0")

    def send_data(self, stream_id: int, payload: bytes) -> bytes:
        """``send(Data(...))`` without building the event: the per-chunk path. A client's DATA (an
        exchange's message, version 2) must fit the credit the server granted on that stream."""
        if stream_id not in self.open_streams:
            raise LocalProtocolError(f"DATA on stream {stream_id}, which is not open")
        if stream_id in self.answer_credit and self.role is Role.SERVER:
            self._take_answer_credit(stream_id, len(payload), LocalProtocolError)
        elif self.role is Role.CLIENT:
            self._check_client_may_send(stream_id, "DATA")
            available = self.credit.get(stream_id, 0)
            if len(payload) > available:
                raise LocalProtocolError(
                    f"DATA of {len(payload)} bytes on stream {stream_id} with {available} of credit"
                )
            self.credit[stream_id] = available - len(payload)
        return self._frame(FrameType.DATA, stream_id, payload)

    def _check_client_may_send(self, stream_id: int, what: str) -> None:
        if self.version < EXCHANGES_VERSION:
            raise LocalProtocolError(f"a client may not send {what} before protocol version 2")
        if stream_id in self.client_ended:
            raise LocalProtocolError(f"{what} on stream {stream_id} after this client's END")

    def _send_client_end(self, stream_id: int) -> bytes:
        """The client's half-close of an exchange (version 2): the stream stays open for the answers."""
        if stream_id not in self.open_streams:
            return b""  # the server ended it first: nothing left to close
        self._check_client_may_send(stream_id, "END")
        self.client_ended[stream_id] = None
        return self._frame(FrameType.END, stream_id, b"")

    def _send_window_update(self, stream_id: int, payload: bytes, event: Event) -> bytes:
        """More credit on an open stream: a server's for the client's DATA (version 2), a client's for
        the server's DATA, the answers (version 3)."""
        needed = EXCHANGES_VERSION if self.role is Role.SERVER else ANSWER_CREDIT_VERSION
        if self.version < needed:
            raise LocalProtocolError(
                f"a {self.role.value} may not send WINDOW_UPDATE before protocol version {needed}"
            )
        assert isinstance(event, WindowUpdate)
        if stream_id not in self.open_streams:
            return b""  # ended meanwhile: no credit to give
        credit = self.credit if self.role is Role.SERVER else self.answer_credit
        credit[stream_id] = credit.get(stream_id, 0) + event.increment
        return self._frame(FrameType.WINDOW_UPDATE, stream_id, payload)

    def send_refusal(self, error: Error) -> bytes:
        """The bytes that end a connection with a connection ERROR (stream 0) even while the handshake
        is unfinished (a bad HELLO): our preface and HELLO go first if they have not yet, since a peer
        parses nothing before them. The message is cut to fit the smallest frame limit any peer has."""
        if error.stream_id != 0:
            raise LocalProtocolError("a refusal is a connection error, on stream 0")
        preface = b"" if self._hello_sent else self._send_hello()
        # Cut on a character boundary: the peer rejects a message that is not valid UTF-8.
        message = error.message.encode()[: MIN_MAX_FRAME_SIZE - _ERROR_HEAD.size].decode(errors="ignore")
        payload = _ERROR_HEAD.pack(error.code, int(error.retryable)) + message.encode()
        return preface + HEADER.pack(len(payload), FrameType.ERROR, 0) + payload

    def _send_hello(self) -> bytes:
        if self._hello_sent:
            raise LocalProtocolError("HELLO was already sent")
        self._hello_sent = True
        return MAGIC + self._frame(FrameType.HELLO, 0, _HELLO.pack(*_hello_fields(self.local_hello)))

    def _check_sender(self, frame_type: FrameType) -> None:
        sender = _SENT_BY.get(frame_type)
        if sender is not None and sender is not self.role:
            raise LocalProtocolError(f"a {self.role.value} may not send {frame_type.name}")

    def _frame(self, frame_type: FrameType, stream_id: int, payload: bytes) -> bytes:
        limit = self.peer_hello.max_frame_size if self.peer_hello is not None else _HELLO.size
        if len(payload) > limit:
            raise LocalProtocolError(
                f"frame of {len(payload)} bytes exceeds the peer's limit of {limit} bytes"
            )
        return HEADER.pack(len(payload), frame_type, stream_id) + payload


class _Dropped:
    """Marker for a frame on a closed stream; ``next_event`` callers never see it (see below)."""


_DROPPED: Final = _Dropped()


def _hello_fields(hello: Hello) -> tuple[int, int, int]:
    return hello.version, hello.max_frame_size, hello.max_streams


# ---- payload encoding ----------------------------------------------------------------------------


def _unpack(fmt: struct.Struct, payload: bytes, offset: int) -> tuple[int, ...]:
    if len(payload) < offset + fmt.size:
        raise RemoteProtocolError("frame payload is truncated")
    return fmt.unpack_from(payload, offset)


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError("text field is not valid UTF-8") from None


def _read_str(payload: bytes, offset: int) -> tuple[str, int]:
    (length,) = _unpack(_U16, payload, offset)
    start = offset + _U16.size
    if len(payload) < start + length:
        raise RemoteProtocolError("string field runs past the end of the frame")
    return _text(payload[start : start + length]), start + length


def _write_str(value: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise LocalProtocolError("string field longer than 65535 bytes")
    return _U16.pack(len(raw)) + raw


def _decode_request(stream_id: int, payload: bytes) -> Request:
    endpoint, offset = _read_str(payload, 0)
    request_id, offset = _read_str(payload, offset)
    (timeout_ms,) = _unpack(_U32, payload, offset)
    (count,) = _unpack(_U16, payload, offset + _U32.size)
    offset += _U32.size + _U16.size
    metadata = []
    for _ in range(count):
        key, offset = _read_str(payload, offset)
        value, offset = _read_str(payload, offset)
        metadata.append((key, value))
    return Request(stream_id, endpoint, request_id, timeout_ms, tuple(metadata), payload[offset:])


def _encode_request(event: Request) -> bytes:
    if len(event.metadata) > 0xFFFF:
        raise LocalProtocolError("more than 65535 metadata entries")
    if not 0 <= event.timeout_ms <= 0xFFFFFFFF:
        raise LocalProtocolError("timeout_ms must fit in 32 bits")
    parts = [_write_str(event.endpoint), _write_str(event.request_id)]
    parts.append(_U32.pack(event.timeout_ms) + _U16.pack(len(event.metadata)))
    parts.extend(_write_str(k) + _write_str(v) for k, v in event.metadata)
    parts.append(event.payload)
    return b"".join(parts)


def _decode_error(stream_id: int, payload: bytes) -> Error:
    code, flags = _unpack(_ERROR_HEAD, payload, 0)
    return Error(stream_id, code, bool(flags & 1), _text(payload[_ERROR_HEAD.size :]))


def _decode_window_update(stream_id: int, payload: bytes) -> WindowUpdate:
    if len(payload) != _U32.size:
        raise RemoteProtocolError("WINDOW_UPDATE carries a 4-byte increment")
    (increment,) = _U32.unpack(payload)
    if increment == 0:
        raise RemoteProtocolError("WINDOW_UPDATE with an increment of 0")
    return WindowUpdate(stream_id, increment)


def _decode_heartbeat(frame_type: FrameType, payload: bytes) -> Ping | Pong:
    if frame_type is FrameType.PING:
        if len(payload) != PING_OPAQUE_SIZE:
            raise RemoteProtocolError(f"PING carries exactly {PING_OPAQUE_SIZE} opaque bytes")
        return Ping(payload)
    if len(payload) < PING_OPAQUE_SIZE:
        raise RemoteProtocolError(f"PONG starts with the {PING_OPAQUE_SIZE} opaque bytes of its PING")
    return Pong(payload[:PING_OPAQUE_SIZE], payload[PING_OPAQUE_SIZE:])


def _decode_empty(frame_type: type[End | Stop | Kill]) -> Callable[[int, bytes], Event]:
    def decode(stream_id: int, payload: bytes) -> End | Stop | Kill:
        if payload:
            raise RemoteProtocolError(f"{frame_type.__name__.upper()} frames carry no payload")
        return frame_type(stream_id)

    return decode


_DECODERS: Final[dict[FrameType, Callable[[int, bytes], Event]]] = {
    FrameType.REQUEST: _decode_request,
    FrameType.DATA: Data,
    FrameType.END: _decode_empty(End),
    FrameType.ERROR: _decode_error,
    FrameType.STOP: _decode_empty(Stop),
    FrameType.KILL: _decode_empty(Kill),
    FrameType.WINDOW_UPDATE: _decode_window_update,
}


def _encode(event: Event) -> tuple[FrameType, int, bytes]:
    if isinstance(event, Request):
        if not 0 < event.stream_id <= _MAX_STREAM_ID:
            raise LocalProtocolError("stream ids run from 1 to 2**32-1")
        return FrameType.REQUEST, event.stream_id, _encode_request(event)
    if isinstance(event, End):
        return FrameType.END, event.stream_id, b""
    if isinstance(event, Error):
        return (
            FrameType.ERROR,
            event.stream_id,
            _ERROR_HEAD.pack(event.code, int(event.retryable)) + event.message.encode(),
        )
    if isinstance(event, Stop):
        return FrameType.STOP, event.stream_id, b""
    if isinstance(event, Kill):
        return FrameType.KILL, event.stream_id, b""
    if isinstance(event, GoAway):
        return FrameType.GOAWAY, 0, _U32.pack(event.last_stream_id) + event.message.encode()
    if isinstance(event, WindowUpdate):
        if not 0 < event.increment <= 0xFFFFFFFF:
            raise LocalProtocolError("a WINDOW_UPDATE increment runs from 1 to 2**32-1")
        return FrameType.WINDOW_UPDATE, event.stream_id, _U32.pack(event.increment)
    if isinstance(event, Ping | Pong):
        if len(event.opaque) != PING_OPAQUE_SIZE:
            raise LocalProtocolError(f"a PING's opaque value is {PING_OPAQUE_SIZE} bytes")
        if isinstance(event, Ping):
            return FrameType.PING, 0, event.opaque
        return FrameType.PONG, 0, event.opaque + event.report
    raise LocalProtocolError(f"cannot send {event!r}")
