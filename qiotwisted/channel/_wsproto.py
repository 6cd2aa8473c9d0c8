"""Sans-IO websocket protocol: the server's opening handshake and RFC 6455 framing.

Nothing here does I/O, schedules or reads a clock behind the caller's back.
Both objects follow h11's shape: feed received bytes with ``receive_data``
(``b""`` means end-of-file), pull events with ``next_event`` until it returns
:data:`NEED_DATA`, and turn what you want to send into bytes with the
``send_*`` methods.  The caller owns sockets, threads and time.

:class:`ServerHandshake` applies QEMU's validation rules for the HTTP upgrade
request (``io/channel-websock.c``), with QEMU's status codes:

======================================================  ==============================
failure                                                  response
======================================================  ==============================
no ``\\r\\n\\r\\n`` within the first 4096 bytes          403 Request Entity Too Large
method is not ``GET``, malformed request line            400 Bad Request
path is not ``/``                                        404 Not Found
version is not ``HTTP/1.1``                              400 Bad Request
header line without ``:``, more than 32 header lines     400 Bad Request
missing Sec-WebSocket-Version / -Key, Host,              400 Bad Request
Connection, Upgrade
Sec-WebSocket-Protocol given without ``binary``          400 Bad Request
Sec-WebSocket-Version other than 13                      400 Bad Request (with
                                                         ``Sec-WebSocket-Version: 13``)
key not 24 characters of base64 for 16 bytes             400 Bad Request
``Connection`` has no ``upgrade`` token                  400 Bad Request
``Upgrade`` is not ``websocket``                         400 Bad Request
end-of-file before the end of the headers                no response
======================================================  ==============================

Where this differs from QEMU, on purpose: a request line without any space
gets a 400 (QEMU sends nothing); the key must also decode as base64 to 16
bytes (QEMU checks only its length); ``Sec-WebSocket-Protocol`` is read as a
comma-separated token list (QEMU searches for the substring ``binary``);
header values lose trailing as well as leading blanks; error responses end
with the blank line and ``Content-Length: 0`` (QEMU's 400 omits the blank line
and none says the body is empty, so a client would wait for the close).

:class:`WebsockConnection` is the framing layer for either role (QEMU only has
the server's).  As in QEMU, only binary data frames are accepted: a text frame
is refused with close code 1003 (1008 if it is fragmented), and a frame from a
client that is not masked with 1002.  Beyond QEMU, the RFC's other rules are
enforced with 1002: reserved bits, fragmented or oversized (> 125 bytes)
control frames, continuation frames outside a fragmented message, a new
message inside one, 64-bit lengths with the top bit set, and malformed close
payloads (1007 for a reason that is not UTF-8).  Control frames may be
interleaved within a fragmented message.  Data payloads are streamed: a frame
of any length is delivered in pieces as its bytes arrive, so memory does not
grow with frame size.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Final

from ..errors import ChannelError

__all__ = [
    "GUID",
    "MAX_CONTROL_PAYLOAD",
    "MAX_HANDSHAKE_SIZE",
    "MAX_HEADERS",
    "NEED_DATA",
    "Accepted",
    "Close",
    "CloseCode",
    "Data",
    "EndOfStream",
    "Event",
    "HandshakeError",
    "HandshakeState",
    "NeedData",
    "Opcode",
    "Ping",
    "Pong",
    "Request",
    "Role",
    "ServerHandshake",
    "StreamState",
    "WebsockConnection",
    "WebsockProtocolError",
    "accept_key",
    "apply_mask",
    "encode_frame",
]

GUID: Final = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: QEMU's limit on the request's header block, terminator included.
MAX_HANDSHAKE_SIZE: Final = 4096
#: QEMU's limit on header lines.
MAX_HEADERS: Final = 32
MAX_CONTROL_PAYLOAD: Final = 125
SUPPORTED_VERSION: Final = "13"
PROTOCOL_BINARY: Final = "binary"


class Opcode(enum.IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(enum.IntEnum):
    """The close status codes this module sends (QEMU's set)."""

    NORMAL = 1000
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    TOO_LARGE = 1009
    SERVER_ERROR = 1011


class Role(enum.Enum):
    """Which end a :class:`WebsockConnection` plays: it decides who masks."""

    SERVER = "server"
    CLIENT = "client"


class NeedData(enum.Enum):
    NEED_DATA = "need data"


#: ``next_event`` has nothing more until more bytes (or EOF) are fed.
NEED_DATA: Final = NeedData.NEED_DATA


# ---- errors -----------------------------------------------------------------------------------


class HandshakeError(ChannelError):
    """The opening handshake failed.

    :attr:`status` is the HTTP status sent back (``None`` when nothing is
    sent, e.g. end-of-file before the headers ended) and :attr:`response`
    the bytes to send (``b""`` then).
    """

    def __init__(self, message: str, status: int | None = None, response: bytes = b"") -> None:
        super().__init__(message)
        self.status = status
        self.response = response


class WebsockProtocolError(ChannelError):
    """The peer broke the websocket protocol.

    :attr:`code` is the close status to send it (``None`` when no close frame
    can be sent, as for an end-of-file in the middle of a frame);
    :attr:`reason` a short text for the close frame.
    """

    def __init__(self, message: str, code: int | None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


# ---- handshake ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """The parsed upgrade request.  Header names are lower-cased, in arrival order."""

    method: str
    path: str
    version: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """The first value of header *name* (case-insensitive), as QEMU looks headers up."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True)
class Accepted:
    """The request is valid: send :attr:`response` (the 101), then speak websocket.

    :attr:`subprotocol` is ``"binary"`` when the client asked for a
    subprotocol, else ``None``.
    """

    request: Request
    response: bytes
    subprotocol: str | None


class HandshakeState(enum.Enum):
    RECEIVING = "receiving"
    ACCEPTED = "accepted"
    REJECTED = "rejected"


_REASONS: Final = {
    101: "Switching Protocols",
    400: "Bad Request",
    # QEMU's reason phrase, kept verbatim although 403 is "Forbidden" (and 413
    # would be the usual code): clients key on the number, humans on the text.
    403: "Request Entity Too Large",
    404: "Not Found",
    500: "Internal Server Error",
}


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``."""
    digest = hashlib.sha1((key + GUID).encode("ascii"), usedforsecurity=False).digest()
    return base64.b64encode(digest).decode("ascii")


def _valid_key(key: str) -> bool:
    if len(key) != 24:
        return False
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (binascii.Error, UnicodeEncodeError):
        return False


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ServerHandshake:
    """Parse and validate a websocket upgrade request; build the response.

    Feed bytes with :meth:`receive_data` (``b""`` = end-of-file), then call
    :meth:`next_event`: it returns :data:`NEED_DATA` until the header block is
    complete, then an :class:`Accepted` event (once), or raises
    :class:`HandshakeError` carrying the error response to send (every later
    call raises it again).  Bytes that followed the header block are in
    :attr:`trailing_data`: they belong to the websocket stream.

    :param server: the ``Server:`` header value.
    :param clock: returns the current time (seconds since the epoch) for the
        ``Date:`` header; injected so tests can fix it.
    :param max_size: the header block limit (QEMU's 4096 bytes).
    """

    def __init__(
        self,
        *,
        server: str = "qiotwisted",
        clock: Callable[[], float] = time.time,
        max_size: int = MAX_HANDSHAKE_SIZE,
    ) -> None:
        self._server = server
        self._clock = clock
        self._max_size = max_size
        self._buf = bytearray()
        self._scanned = 0
        self._eof = False
        self._state = HandshakeState.RECEIVING
        self._result: Accepted | HandshakeError | None = None
        self._delivered = False
        self.trailing_data = b""

    @property
    def state(self) -> HandshakeState:
        return self._state

    @property
    def bytes_wanted(self) -> int:
        """How many more bytes can still belong to the header block (0 once decided).

        A caller that reads at most this much never takes websocket frames off
        the wire before the handshake is over (QEMU reads the same way).
        """
        if self._state is not HandshakeState.RECEIVING:
            return 0
        return max(1, self._max_size - len(self._buf))

    def receive_data(self, data: bytes) -> None:
        """Add received bytes; ``b""`` means the peer closed its end."""
        if self._eof:
            if data:
                raise ValueError("data received after end-of-file")
            return
        if not data:
            self._eof = True
        elif self._state is HandshakeState.RECEIVING:
            self._buf += data
        else:
            self.trailing_data += bytes(data)

    def next_event(self) -> Accepted | NeedData:
        """:data:`NEED_DATA`, the :class:`Accepted` event, or raise :class:`HandshakeError`."""
        if self._state is HandshakeState.RECEIVING:
            self._result = self._try_parse()
            if self._result is None:
                return NEED_DATA
        result = self._result
        if isinstance(result, HandshakeError):
            raise result
        if self._delivered:
            return NEED_DATA
        self._delivered = True
        assert result is not None
        return result

    # ---- internals -----------------------------------------------------------------------

    def _try_parse(self) -> Accepted | HandshakeError | None:
        buf = self._buf
        # Resume the search just before the old end: the terminator may straddle chunks.
        start = max(0, self._scanned - 3)
        end = buf.find(b"\r\n\r\n", start, self._max_size)
        if end < 0:
            self._scanned = min(len(buf), self._max_size)
            if len(buf) >= self._max_size:
                self._state = HandshakeState.REJECTED
                return self._error(403, f"End of headers not found in first {self._max_size} bytes")
            if self._eof:
                self._state = HandshakeState.REJECTED
                return HandshakeError("End of headers not found before connection closed")
            return None
        block = bytes(buf[:end]).decode("latin-1")
        self.trailing_data = bytes(buf[end + 4 :]) + self.trailing_data
        self._buf = bytearray()
        try:
            request = _parse_request(block)
            subprotocol = _validate(request)
        except _Reject as e:
            self._state = HandshakeState.REJECTED
            return self._error(e.status, str(e))
        self._state = HandshakeState.ACCEPTED
        key = request.header("sec-websocket-key")
        assert key is not None
        lines = [
            "HTTP/1.1 101 Switching Protocols",
            *self._common_headers(),
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Accept: {accept_key(key)}",
        ]
        if subprotocol is not None:
            lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
        return Accepted(request, _http(lines), subprotocol)

    def _common_headers(self) -> list[str]:
        return [f"Server: {self._server}", f"Date: {formatdate(self._clock(), usegmt=True)}"]

    def _error(self, status: int, message: str) -> HandshakeError:
        lines = [
            f"HTTP/1.1 {status} {_REASONS[status]}",
            *self._common_headers(),
            "Connection: close",
        ]
        if status == 400:
            lines.append(f"Sec-WebSocket-Version: {SUPPORTED_VERSION}")
        lines.append("Content-Length: 0")
        return HandshakeError(message, status, _http(lines))


def _http(lines: list[str]) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _parse_request(block: str) -> Request:
    """QEMU's ``extract_headers``: the request line, then up to 32 ``name: value`` lines."""
    request_line, sep, rest = block.partition("\r\n")
    if not sep:
        raise _Reject(400, "Missing HTTP header delimiter")
    method, sep, after = request_line.partition(" ")
    if not sep:
        raise _Reject(400, "Missing HTTP path delimiter")
    if method != "GET":
        raise _Reject(400, f"Unsupported HTTP method {method}")
    path, sep, version = after.partition(" ")
    if not sep:
        raise _Reject(400, "Missing HTTP version delimiter")
    if path != "/":
        raise _Reject(404, f"Unexpected HTTP path {path}")
    if version != "HTTP/1.1":
        raise _Reject(400, f"Unsupported HTTP version {version}")
    headers: list[tuple[str, str]] = []
    for line in rest.split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep:
            raise _Reject(400, "Malformed HTTP header")
        if len(headers) >= MAX_HEADERS:
            raise _Reject(400, "Too many HTTP headers")
        headers.append((name.lower(), value.strip(" \t")))
    return Request(method, path, version, tuple(headers))


def _validate(request: Request) -> str | None:
    """QEMU's ``handshake_process`` checks, in QEMU's order; returns the subprotocol."""
    values: dict[str, str] = {}
    for name, what in (
        ("sec-websocket-version", "version"),
        ("sec-websocket-key", "key"),
        ("host", "host"),
        ("connection", "connection"),
        ("upgrade", "upgrade"),
    ):
        value = request.header(name)
        if value is None:
            raise _Reject(400, f"Missing websocket {what} header data")
        values[name] = value
    protocols = request.header("sec-websocket-protocol")
    if protocols is not None:
        offered = [p.strip(" \t") for p in protocols.split(",")]
        if PROTOCOL_BINARY not in offered:
            raise _Reject(
                400, f"No '{PROTOCOL_BINARY}' protocol is supported by client '{protocols}'"
            )
    version = values["sec-websocket-version"]
    if version != SUPPORTED_VERSION:
        raise _Reject(400, f"Version '{version}' is not supported, only '{SUPPORTED_VERSION}' is")
    key = values["sec-websocket-key"]
    if not _valid_key(key):
        raise _Reject(400, f"Key '{key}' is not the base64 encoding of 16 bytes")
    connection = values["connection"]
    if not any(t.strip(" \t").lower() == "upgrade" for t in connection.split(",")):
        raise _Reject(400, f"No connection upgrade requested '{connection}'")
    upgrade = values["upgrade"]
    if upgrade.lower() != "websocket":
        raise _Reject(400, f"Incorrect upgrade method '{upgrade}'")
    return PROTOCOL_BINARY if protocols is not None else None


# ---- framing ----------------------------------------------------------------------------------


def apply_mask(data: bytes | bytearray | memoryview, key: bytes, offset: int = 0) -> bytes:
    """XOR *data* with the 4-byte mask *key*, starting *offset* bytes into the payload.

    One big-integer XOR: linear in C, far faster than a Python byte loop.
    """
    n = len(data)
    if n == 0:
        return b""
    phase = offset & 3
    if phase:
        key = key[phase:] + key[:phase]
    pad = (key * ((n >> 2) + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(pad, "big")).to_bytes(n, "big")


def _header(opcode: int, length: int, *, fin: bool, mask: bytes | None, rsv: int = 0) -> bytes:
    b0 = (0x80 if fin else 0) | (rsv & 0x7) << 4 | (opcode & 0x0F)
    m = 0x80 if mask is not None else 0
    if length < 126:
        head = struct.pack("!BB", b0, m | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", b0, m | 126, length)
    else:
        head = struct.pack("!BBQ", b0, m | 127, length)
    return head + mask if mask is not None else head


def encode_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    mask: bytes | None = None,
    rsv: int = 0,
) -> bytes:
    """One frame as bytes, masked with the 4-byte *mask* if given.

    The shortest length encoding is used (7-bit below 126, then 16-bit, then
    64-bit).  No checks: tests use it to craft invalid frames too.
    """
    head = _header(opcode, len(payload), fin=fin, mask=mask, rsv=rsv)
    return head + (apply_mask(payload, mask) if mask is not None else bytes(payload))


@dataclass(frozen=True)
class Data:
    """Payload bytes of a binary message, in order.

    A frame's payload may come as several events; :attr:`message_finished`
    is true on the last piece of a message (an empty piece may carry it).
    """

    data: bytes
    message_finished: bool


@dataclass(frozen=True)
class Ping:
    payload: bytes


@dataclass(frozen=True)
class Pong:
    payload: bytes


@dataclass(frozen=True)
class Close:
    """The peer's close frame; *code* is ``None`` if it carried no status."""

    code: int | None
    reason: str


@dataclass(frozen=True)
class EndOfStream:
    """The byte stream ended (after a close frame, or cleanly between frames)."""


Event = Data | Ping | Pong | Close | EndOfStream


class StreamState(enum.Enum):
    """Where the incoming stream is (the decoder's state machine)."""

    HEADER = "header"  # waiting for (the rest of) a frame header
    DATA = "data"  # streaming a binary/continuation payload
    CONTROL = "control"  # collecting a control frame's payload
    CLOSED = "closed"  # a close frame arrived; everything after it is ignored
    ENDED = "ended"  # end-of-file seen; nothing more will come
    ERROR = "error"  # a protocol error was raised; it is raised again


def _valid_close_code(code: int) -> bool:
    """Close codes a peer may send (RFC 6455 section 7.4 and the IANA registry)."""
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014) or (
        3000 <= code <= 4999
    )


class WebsockConnection:
    """RFC 6455 framing for one end of a connection, fed bytes, giving events.

    The :attr:`role` decides masking: a server expects masked frames and
    sends unmasked ones; a client the reverse (its mask keys come from
    *mask_source*, ``os.urandom`` by default).

    Receiving: :meth:`receive_data` (``b""`` = end-of-file), then
    :meth:`next_event` until :data:`NEED_DATA`.  Events are :class:`Data`,
    :class:`Ping`, :class:`Pong`, :class:`Close` and :class:`EndOfStream`.
    Replies are the caller's business (a :class:`Ping` wants
    :meth:`send_pong`, a :class:`Close` wants :meth:`send_close`).  After a
    close frame further bytes are ignored.  A protocol violation raises
    :class:`WebsockProtocolError` (whose :attr:`~WebsockProtocolError.code`
    says which close code to send back) from that call and every later one;
    so does end-of-file in the middle of a frame, with ``code=None``.

    Sending: :meth:`send_data`, :meth:`send_ping`, :meth:`send_pong`,
    :meth:`send_close` return the bytes to write.  Nothing is sent after a
    close frame (``ValueError``).
    """

    def __init__(
        self, role: Role = Role.SERVER, *, mask_source: Callable[[int], bytes] = os.urandom
    ) -> None:
        self.role = role
        self._mask_source = mask_source
        self._in = bytearray()
        self._eof = False
        self._state = StreamState.HEADER
        self._error: WebsockProtocolError | None = None
        self._ended_reported = False
        # the frame being decoded
        self._fin = False
        self._opcode = 0
        self._mask: bytes | None = None
        self._remaining = 0
        self._offset = 0  # payload bytes of this frame already delivered (mask phase)
        # between frames
        self._in_message = False
        # sending
        self._sending_message = False
        self._close_sent = False

    @property
    def state(self) -> StreamState:
        return self._state

    @property
    def close_sent(self) -> bool:
        return self._close_sent

    @property
    def in_message(self) -> bool:
        """True while a fragmented message is being received."""
        return self._in_message

    # ---- receiving -------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes; ``b""`` means the peer closed its end of the stream."""
        if self._eof:
            if data:
                raise ValueError("data received after end-of-file")
            return
        if not data:
            self._eof = True
        elif self._state is not StreamState.CLOSED and self._state is not StreamState.ERROR:
            self._in += data

    def next_event(self) -> Event | NeedData:
        """The next event, or :data:`NEED_DATA`; raises :class:`WebsockProtocolError`."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except WebsockProtocolError as e:
            self._state = StreamState.ERROR
            self._in = bytearray()
            self._error = e
            raise

    def _next(self) -> Event | NeedData:
        state = self._state
        if state is StreamState.HEADER:
            if not self._parse_header():
                return self._at_end()
            state = self._state
            if state is StreamState.DATA and self._remaining == 0:
                return self._data_event(b"")
        if state is StreamState.DATA:
            n = min(self._remaining, len(self._in))
            if n == 0:
                return self._at_end()
            chunk = self._take(n)
            return self._data_event(chunk)
        if state is StreamState.CONTROL:
            if len(self._in) < self._remaining:
                return self._at_end()
            payload = self._take(self._remaining)
            return self._control_event(payload)
        if state is StreamState.CLOSED:
            if self._eof:
                return self._end()
            return NEED_DATA
        if state is StreamState.ENDED:
            return NEED_DATA
        raise AssertionError(f"unreachable state {state}")  # pragma: no cover

    def _at_end(self) -> NeedData | EndOfStream:
        """No complete unit is buffered: wait, or report end-of-file."""
        if not self._eof:
            return NEED_DATA
        if self._state is StreamState.HEADER and not self._in:
            return self._end()
        raise WebsockProtocolError(
            "Unexpected end-of-file in the middle of a websocket frame", None
        )

    def _end(self) -> EndOfStream | NeedData:
        self._state = StreamState.ENDED
        if self._ended_reported:
            return NEED_DATA
        self._ended_reported = True
        return EndOfStream()

    def _take(self, n: int) -> bytes:
        raw = bytes(self._in[:n]) if n < len(self._in) else bytes(self._in)
        del self._in[:n]
        mask = self._mask
        data = apply_mask(raw, mask, self._offset) if mask is not None else raw
        self._offset += n
        self._remaining -= n
        return data

    def _data_event(self, chunk: bytes) -> Data:
        finished = False
        if self._remaining == 0:
            self._state = StreamState.HEADER
            if self._fin:
                self._in_message = False
                finished = True
        return Data(chunk, finished)

    def _control_event(self, payload: bytes) -> Event:
        self._state = StreamState.HEADER
        opcode = self._opcode
        if opcode == Opcode.PING:
            return Ping(payload)
        if opcode == Opcode.PONG:
            return Pong(payload)
        # CLOSE
        if len(payload) == 1:
            raise WebsockProtocolError(
                "websocket close frame with a 1-byte payload",
                CloseCode.PROTOCOL_ERROR,
                "invalid close frame",
            )
        code: int | None = None
        reason = ""
        if payload:
            (code,) = struct.unpack("!H", payload[:2])
            if not _valid_close_code(code):
                raise WebsockProtocolError(
                    f"websocket close frame with invalid status code {code}",
                    CloseCode.PROTOCOL_ERROR,
                    "invalid close code",
                )
            try:
                reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                raise WebsockProtocolError(
                    "websocket close frame reason is not valid UTF-8",
                    CloseCode.INVALID_DATA,
                    "invalid close reason",
                ) from None
        self._state = StreamState.CLOSED
        self._in = bytearray()
        return Close(code, reason)

    def _parse_header(self) -> bool:
        """Decode a complete frame header from the buffer; False if it is incomplete."""
        buf = self._in
        if len(buf) < 2:
            return False
        b0, b1 = buf[0], buf[1]
        fin = bool(b0 & 0x80)
        opcode = b0 & 0x0F
        masked = bool(b1 & 0x80)
        length = b1 & 0x7F
        # Validate what the first two bytes already say, before waiting for the rest.
        self._check_frame(b0 & 0x70, fin, opcode, masked, length)
        pos = 2
        if length == 126:
            if len(buf) < 4:
                return False
            (length,) = struct.unpack_from("!H", buf, 2)
            pos = 4
        elif length == 127:
            if len(buf) < 10:
                return False
            (length,) = struct.unpack_from("!Q", buf, 2)
            if length >> 63:
                raise WebsockProtocolError(
                    "websocket frame length has the most significant bit set",
                    CloseCode.PROTOCOL_ERROR,
                    "invalid frame length",
                )
            pos = 10
        if masked:
            if len(buf) < pos + 4:
                return False
            self._mask = bytes(buf[pos : pos + 4])
            pos += 4
        else:
            self._mask = None
        del buf[:pos]
        self._fin = fin
        self._opcode = opcode
        self._remaining = length
        self._offset = 0
        if opcode & 0x8:
            self._state = StreamState.CONTROL
        else:
            self._state = StreamState.DATA
            if not fin:
                self._in_message = True
        return True

    def _check_frame(self, rsv: int, fin: bool, opcode: int, masked: bool, length: int) -> None:
        """The frame rules; raises :class:`WebsockProtocolError` with the close code to send."""
        err = WebsockProtocolError
        if rsv:
            raise err(
                "websocket frame has reserved bits set (no extension was negotiated)",
                CloseCode.PROTOCOL_ERROR,
                "reserved bits set",
            )
        if opcode & 0x8:
            if opcode not in (Opcode.CLOSE, Opcode.PING, Opcode.PONG):
                raise err(
                    f"unsupported opcode: {opcode:#04x}; only binary, close, ping, and pong"
                    " websocket frames are supported",
                    CloseCode.UNSUPPORTED_DATA,
                    "only binary, close, ping, and pong frames are supported",
                )
            if not fin:
                raise err(
                    "websocket control frames may not be fragmented",
                    CloseCode.PROTOCOL_ERROR,
                    "fragmented control frame",
                )
            if length > MAX_CONTROL_PAYLOAD:
                raise err(
                    "websocket control frame is too large",
                    CloseCode.PROTOCOL_ERROR,
                    "control frame is too large",
                )
        elif opcode == Opcode.CONTINUATION:
            if not self._in_message:
                raise err(
                    "websocket continuation frame without a fragmented message to continue",
                    CloseCode.PROTOCOL_ERROR,
                    "unexpected continuation frame",
                )
        elif opcode == Opcode.BINARY:
            if self._in_message:
                raise err(
                    "websocket data frame inside a fragmented message",
                    CloseCode.PROTOCOL_ERROR,
                    "expected a continuation frame",
                )
        elif not fin:
            # QEMU's rule: only binary frames may be fragmented (policy, 1008).
            raise err(
                "only binary websocket frames may be fragmented",
                CloseCode.POLICY_VIOLATION,
                "only binary frames may be fragmented",
            )
        else:
            raise err(
                f"unsupported opcode: {opcode:#04x}; only binary, close, ping, and pong"
                " websocket frames are supported",
                CloseCode.UNSUPPORTED_DATA,
                "only binary, close, ping, and pong frames are supported",
            )
        if self.role is Role.SERVER and not masked:
            raise err(
                "client websocket frames must be masked",
                CloseCode.PROTOCOL_ERROR,
                "client frames must be masked",
            )
        if self.role is Role.CLIENT and masked:
            raise err(
                "server websocket frames must not be masked",
                CloseCode.PROTOCOL_ERROR,
                "server frames must not be masked",
            )

    # ---- sending -----------------------------------------------------------------------------

    def _new_mask(self) -> bytes | None:
        if self.role is Role.SERVER:
            return None
        key = self._mask_source(4)
        if len(key) != 4:
            raise ValueError("mask_source must return 4 bytes")
        return key

    def _check_can_send(self) -> None:
        if self._close_sent:
            raise ValueError("a close frame was already sent")

    def send_data(self, data: bytes | bytearray | memoryview, *, fin: bool = True) -> list[bytes]:
        """A binary frame (a continuation frame inside a message) carrying *data*.

        ``fin=False`` leaves the message open: the next ``send_data`` continues
        it.  Returns the pieces to write in order; an unmasked ``bytes``
        payload is passed through without a copy.
        """
        self._check_can_send()
        opcode = Opcode.CONTINUATION if self._sending_message else Opcode.BINARY
        self._sending_message = not fin
        mask = self._new_mask()
        head = _header(opcode, len(data), fin=fin, mask=mask)
        if mask is not None:
            return [head, apply_mask(data, mask)]
        if not data:
            return [head]
        return [head, data if type(data) is bytes else bytes(data)]

    def _control(self, opcode: Opcode, payload: bytes) -> bytes:
        self._check_can_send()
        if len(payload) > MAX_CONTROL_PAYLOAD:
            raise ValueError(f"control frame payload over {MAX_CONTROL_PAYLOAD} bytes")
        return encode_frame(opcode, payload, mask=self._new_mask())

    def send_ping(self, payload: bytes = b"") -> bytes:
        return self._control(Opcode.PING, bytes(payload))

    def send_pong(self, payload: bytes = b"") -> bytes:
        return self._control(Opcode.PONG, bytes(payload))

    def send_close(self, code: int | None = CloseCode.NORMAL, reason: str = "") -> bytes:
        """The close frame (*code* ``None``: no status); nothing may be sent after it.

        A *reason* too long for a control frame is truncated (on a character
        boundary) to fit.
        """
        self._check_can_send()
        if code is None:
            payload = b""
        else:
            raw = reason.encode("utf-8")[: MAX_CONTROL_PAYLOAD - 2]
            payload = struct.pack("!H", code) + raw.decode("utf-8", "ignore").encode("utf-8")
        frame = encode_frame(Opcode.CLOSE, payload, mask=self._new_mask())
        self._close_sent = True
        return frame
