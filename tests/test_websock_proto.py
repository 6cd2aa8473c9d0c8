"""The sans-IO websocket layer (qiotwisted.channel._wsproto): handshake parser and framer.

No reactor, no sockets.  The reference peer is the ``websockets`` package's own
sans-IO ``ClientProtocol`` (nobody here wrote it): its requests must be
accepted, our responses must satisfy it, and frames must cross in both
directions.  The hypothesis tests feed arbitrary bytes in arbitrary chunks
and check that only the documented errors come out.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import struct
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.frames import Frame
from websockets.frames import Opcode as WsOpcode
from websockets.protocol import State as WsState
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from qiotwisted.channel._wsproto import (
    MAX_HANDSHAKE_SIZE,
    NEED_DATA,
    Accepted,
    Close,
    Data,
    EndOfStream,
    Event,
    HandshakeError,
    HandshakeState,
    Opcode,
    Ping,
    Pong,
    Role,
    ServerHandshake,
    StreamState,
    WebsockConnection,
    WebsockProtocolError,
    accept_key,
    apply_mask,
    encode_frame,
)
from qiotwisted.errors import ChannelError

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's example key
MASK = b"\x37\xfa\x21\x3d"

GOOD_HEADERS = [
    ("Host", "localhost:5700"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", KEY),
    ("Sec-WebSocket-Version", "13"),
]


def request(
    headers: Iterable[tuple[str, str]] = GOOD_HEADERS,
    *,
    line: str = "GET / HTTP/1.1",
    drop: str | None = None,
    set_: dict[str, str] | None = None,
) -> bytes:
    """An upgrade request; *drop* removes a header, *set_* replaces or adds some."""
    set_ = dict(set_ or {})
    lines = [line]
    for name, value in headers:
        if drop is not None and name.lower() == drop.lower():
            continue
        lines.append(f"{name}: {set_.pop(name, value)}")
    lines += [f"{n}: {v}" for n, v in set_.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def handshake(data: bytes, *, eof: bool = False) -> Accepted | HandshakeError | None:
    hs = ServerHandshake(clock=lambda: 1_700_000_000.0)
    hs.receive_data(data)
    if eof:
        hs.receive_data(b"")
    try:
        ev = hs.next_event()
    except HandshakeError as e:
        return e
    return None if ev is NEED_DATA else ev


def status_line(response: bytes) -> str:
    return response.split(b"\r\n", 1)[0].decode()


def headers_of(response: bytes) -> dict[str, str]:
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in head)}


# ---- handshake: the good path ---------------------------------------------------------------


def test_accept_key_is_rfc6455s_example() -> None:
    assert accept_key(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    digest = hashlib.sha1((KEY + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
    assert accept_key(KEY) == base64.b64encode(digest).decode()


def test_valid_request_gets_101_with_accept_and_date() -> None:
    ev = handshake(request())
    assert isinstance(ev, Accepted)
    assert status_line(ev.response) == "HTTP/1.1 101 Switching Protocols"
    assert ev.response.endswith(b"\r\n\r\n")
    h = headers_of(ev.response)
    assert h["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert h["upgrade"] == "websocket"
    assert h["connection"] == "Upgrade"
    assert h["date"] == "Tue, 14 Nov 2023 22:13:20 GMT"  # from the injected clock
    assert "sec-websocket-protocol" not in h
    assert ev.subprotocol is None
    assert ev.request.path == "/"
    assert ev.request.header("HOST") == "localhost:5700"


@pytest.mark.parametrize("offer", ["binary", "base64, binary", " chat ,binary ", "binary,chat"])
def test_subprotocol_binary_is_answered(offer: str) -> None:
    ev = handshake(request(set_={"Sec-WebSocket-Protocol": offer}))
    assert isinstance(ev, Accepted)
    assert ev.subprotocol == "binary"
    assert headers_of(ev.response)["sec-websocket-protocol"] == "binary"


@pytest.mark.parametrize(
    "name,value",
    [
        ("Connection", "keep-alive, Upgrade"),
        ("Connection", "UPGRADE"),
        ("Upgrade", "WebSocket"),
        ("connection", "upgrade"),  # header names are case-insensitive
    ],
)
def test_case_and_token_rules_accept(name: str, value: str) -> None:
    hdrs = [(n, v) for n, v in GOOD_HEADERS if n.lower() != name.lower()] + [(name, value)]
    assert isinstance(handshake(request(hdrs)), Accepted)


def test_request_fed_byte_by_byte_keeps_trailing_frame_bytes() -> None:
    frame = encode_frame(Opcode.BINARY, b"early", mask=MASK)
    hs = ServerHandshake()
    data = request() + frame
    events = []
    for i in range(len(data)):
        hs.receive_data(data[i : i + 1])
        ev = hs.next_event()
        if ev is not NEED_DATA:
            events.append((i, ev))
    assert len(events) == 1
    assert events[0][0] == len(request()) - 1, "accepted as soon as the blank line arrived"
    assert hs.state is HandshakeState.ACCEPTED
    assert hs.trailing_data == frame
    assert hs.next_event() is NEED_DATA, "the event is delivered once"
    assert hs.bytes_wanted == 0


def test_bytes_wanted_never_lets_a_reader_pass_the_limit() -> None:
    hs = ServerHandshake()
    assert hs.bytes_wanted == MAX_HANDSHAKE_SIZE
    hs.receive_data(b"GET / HTTP/1.1\r\n")
    assert hs.bytes_wanted == MAX_HANDSHAKE_SIZE - 16


def test_websockets_sans_io_client_accepts_our_response() -> None:
    """The reference client validates our 101 (accept key, subprotocol, headers)."""
    for subprotocols in (None, [Subprotocol("binary")]):
        client = ClientProtocol(parse_uri("ws://localhost:5700/"), subprotocols=subprotocols)
        client.send_request(client.connect())
        ev = handshake(b"".join(client.data_to_send()))
        assert isinstance(ev, Accepted)
        client.receive_data(ev.response)
        assert client.handshake_exc is None
        assert client.state is WsState.OPEN
        assert client.subprotocol == (subprotocols[0] if subprotocols else None)


# ---- handshake: every rule and its status code --------------------------------------------------


@pytest.mark.parametrize(
    "data,status,message",
    [
        (request(line="POST / HTTP/1.1"), 400, "Unsupported HTTP method POST"),
        (request(line="GET /vnc HTTP/1.1"), 404, "Unexpected HTTP path /vnc"),
        (request(line="GET /?x=1 HTTP/1.1"), 404, "Unexpected HTTP path /?x=1"),
        (request(line="GET / HTTP/1.0"), 400, "Unsupported HTTP version HTTP/1.0"),
        (request(line="GET"), 400, "Missing HTTP path delimiter"),
        (request(line="GET /"), 400, "Missing HTTP version delimiter"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, "Missing HTTP header delimiter"),
        (
            request(set_={"Bogus line without colon": ""}).replace(b": \r\n", b"\r\n"),
            400,
            "Malformed HTTP header",
        ),
        (request(set_={f"X-{i}": "1" for i in range(28)}), 400, "Too many HTTP headers"),
        (request(drop="Sec-WebSocket-Version"), 400, "Missing websocket version header data"),
        (request(drop="Sec-WebSocket-Key"), 400, "Missing websocket key header data"),
        (request(drop="Host"), 400, "Missing websocket host header data"),
        (request(drop="Connection"), 400, "Missing websocket connection header data"),
        (request(drop="Upgrade"), 400, "Missing websocket upgrade header data"),
        (
            request(set_={"Sec-WebSocket-Protocol": "chat, superchat"}),
            400,
            "No 'binary' protocol is supported by client 'chat, superchat'",
        ),
        (request(set_={"Sec-WebSocket-Protocol": "binaryish"}), 400, "No 'binary' protocol"),
        (request(set_={"Sec-WebSocket-Version": "8"}), 400, "Version '8' is not supported"),
        (request(set_={"Sec-WebSocket-Key": "c2hvcnQ="}), 400, "is not the base64 encoding"),
        (request(set_={"Sec-WebSocket-Key": "A" * 24}), 400, "is not the base64 encoding"),
        (request(set_={"Sec-WebSocket-Key": "!" * 22 + "=="}), 400, "is not the base64"),
        (request(set_={"Connection": "keep-alive"}), 400, "No connection upgrade requested"),
        (request(set_={"Connection": "upgrade-please"}), 400, "No connection upgrade"),
        (request(set_={"Upgrade": "h2c"}), 400, "Incorrect upgrade method 'h2c'"),
    ],
)
def test_each_rule_has_its_status(data: bytes, status: int, message: str) -> None:
    err = handshake(data)
    assert isinstance(err, HandshakeError), err
    assert isinstance(err, ChannelError)
    assert err.status == status
    assert message in str(err)
    reason = {400: "Bad Request", 404: "Not Found"}[status]
    assert status_line(err.response) == f"HTTP/1.1 {status} {reason}"
    h = headers_of(err.response)
    assert h["connection"] == "close"
    assert h["content-length"] == "0"
    assert err.response.endswith(b"\r\n\r\n")
    # QEMU's 400 also tells the client which version it speaks.
    assert ("sec-websocket-version" in h) == (status == 400)
    if status == 400:
        assert h["sec-websocket-version"] == "13"


def test_32_headers_are_fine_33_are_not() -> None:
    base = len(GOOD_HEADERS)
    ok = request(set_={f"X-{i}": "1" for i in range(32 - base)})
    assert isinstance(handshake(ok), Accepted)
    err = handshake(request(set_={f"X-{i}": "1" for i in range(33 - base)}))
    assert isinstance(err, HandshakeError) and err.status == 400


def test_header_block_limit_is_4096_bytes_terminator_included() -> None:
    def padded(total: int) -> bytes:
        base = request()
        filler = total - len(base) - len("X-Pad: \r\n")
        return request(set_={"X-Pad": "p" * filler})

    assert len(padded(4096)) == 4096
    assert isinstance(handshake(padded(4096)), Accepted)
    err = handshake(padded(4097))
    assert isinstance(err, HandshakeError)
    assert err.status == 403
    assert status_line(err.response) == "HTTP/1.1 403 Request Entity Too Large"
    assert "End of headers not found in first 4096 bytes" in str(err)


def test_too_large_is_decided_without_waiting_for_more() -> None:
    hs = ServerHandshake()
    hs.receive_data(b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * 5000)
    with pytest.raises(HandshakeError) as info:
        hs.next_event()
    assert info.value.status == 403
    assert hs.state is HandshakeState.REJECTED
    assert hs.bytes_wanted == 0


def test_eof_before_end_of_headers_has_no_response() -> None:
    err = handshake(request()[:-2], eof=True)
    assert isinstance(err, HandshakeError)
    assert err.status is None and err.response == b""
    assert "End of headers not found before connection closed" in str(err)
    assert handshake(request()[:-2]) is None, "without EOF it just waits"


def test_rejection_is_sticky() -> None:
    hs = ServerHandshake()
    hs.receive_data(request(line="PUT / HTTP/1.1"))
    for _ in range(2):
        with pytest.raises(HandshakeError, match="PUT"):
            hs.next_event()


def test_data_after_eof_is_a_caller_bug() -> None:
    hs = ServerHandshake()
    hs.receive_data(b"")
    with pytest.raises(ValueError):
        hs.receive_data(b"x")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefix=st.sampled_from([b"", b"GET / HTTP/1.1\r\n", request()[:-4]]),
    noise=st.binary(max_size=5000),
    cuts=st.lists(st.integers(min_value=0, max_value=5100), max_size=8),
    eof=st.booleans(),
)
def test_random_requests_only_raise_handshake_error(
    prefix: bytes, noise: bytes, cuts: list[int], eof: bool
) -> None:
    data = prefix + noise
    hs = ServerHandshake()
    outcome: Any = NEED_DATA
    for piece in chunked(data, cuts):
        hs.receive_data(piece)
        try:
            outcome = hs.next_event()
        except HandshakeError as e:
            outcome = e
        if outcome is not NEED_DATA:
            break
    if outcome is NEED_DATA and eof:
        hs.receive_data(b"")
        try:
            outcome = hs.next_event()
        except HandshakeError as e:
            outcome = e
    if isinstance(outcome, HandshakeError):
        assert outcome.status in (None, 400, 403, 404)
        assert bool(outcome.response) == (outcome.status is not None)
    elif isinstance(outcome, Accepted):
        assert outcome.response.startswith(b"HTTP/1.1 101 ")
    else:
        assert outcome is NEED_DATA
        assert not eof
        assert b"\r\n\r\n" not in data[:MAX_HANDSHAKE_SIZE]


# ---- framing helpers ----------------------------------------------------------------------------


def chunked(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def events(conn: WebsockConnection, data: bytes = b"", *, eof: bool = False) -> list[Event]:
    if data:
        conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    out: list[Event] = []
    for _ in range(100_000):
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
    raise AssertionError("too many events")


def payload_of(evs: Iterable[Event]) -> bytes:
    return b"".join(e.data for e in evs if isinstance(e, Data))


def protocol_error(data: bytes, role: Role = Role.SERVER) -> WebsockProtocolError:
    conn = WebsockConnection(role)
    with pytest.raises(WebsockProtocolError) as info:
        events(conn, data)
    # sticky: the same error again, and more data changes nothing
    conn.receive_data(encode_frame(Opcode.BINARY, b"x", mask=MASK))
    with pytest.raises(WebsockProtocolError) as again:
        conn.next_event()
    assert again.value is info.value
    assert conn.state is StreamState.ERROR
    return info.value


def naive_mask(data: bytes, key: bytes, offset: int = 0) -> bytes:
    return bytes(b ^ key[(i + offset) % 4] for i, b in enumerate(data))


# ---- framing: lengths and masking ------------------------------------------------------------


@pytest.mark.parametrize(
    "size,header_len",
    [(0, 2), (1, 2), (125, 2), (126, 4), (65535, 4), (65536, 10), (200_000, 10)],
)
def test_length_encodings_round_trip(size: int, header_len: int) -> None:
    payload = os.urandom(size)
    server = WebsockConnection(Role.SERVER)
    out = b"".join(server.send_data(payload))
    assert len(out) == header_len + size, "server frames are unmasked"
    assert out[0] == 0x82 and not out[1] & 0x80
    client = WebsockConnection(Role.CLIENT, mask_source=lambda n: MASK)
    wire = b"".join(client.send_data(payload))
    assert len(wire) == header_len + 4 + size
    assert wire[1] & 0x80, "client frames are masked"
    assert wire[header_len : header_len + 4] == MASK
    evs = events(WebsockConnection(Role.SERVER), wire)
    assert payload_of(evs) == payload
    assert isinstance(evs[-1], Data) and evs[-1].message_finished
    assert payload_of(events(WebsockConnection(Role.CLIENT), out)) == payload


def test_the_wire_format_is_rfc6455s_examples() -> None:
    # RFC 6455 5.7: a single-frame masked text "Hello" and a 256-byte unmasked binary.
    assert encode_frame(Opcode.TEXT, b"Hello", mask=MASK) == bytes.fromhex("818537fa213d7f9f4d5158")
    assert encode_frame(Opcode.BINARY, bytes(256))[:4] == bytes.fromhex("827e0100")
    assert encode_frame(Opcode.BINARY, bytes(65536))[:10] == bytes.fromhex("827f0000000000010000")
    assert encode_frame(Opcode.PING, b"Hello", mask=MASK)[:2] == b"\x89\x85"


@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4), st.integers(0, 7))
def test_apply_mask_matches_the_definition(data: bytes, key: bytes, offset: int) -> None:
    assert apply_mask(data, key, offset) == naive_mask(data, key, offset)
    assert apply_mask(apply_mask(data, key, offset), key, offset) == data


def test_big_frame_is_streamed_not_buffered() -> None:
    server = WebsockConnection(Role.SERVER)
    size = 1 << 20
    payload = os.urandom(size)
    wire = encode_frame(Opcode.BINARY, payload, mask=MASK)
    got = []
    for piece in chunked(wire, range(0, len(wire), 4093)):
        evs = events(server, piece)
        got += evs
        assert len(server._in) < 14, "payload bytes leave the buffer as they arrive"
    assert payload_of(got) == payload
    assert [e.message_finished for e in got if isinstance(e, Data)][-1]
    assert sum(1 for e in got if isinstance(e, Data) and e.message_finished) == 1


# ---- framing: fragmentation and control frames -------------------------------------------------


def test_fragmented_message_with_interleaved_control_frames() -> None:
    wire = b"".join(
        [
            encode_frame(Opcode.BINARY, b"one-", fin=False, mask=MASK),
            encode_frame(Opcode.PING, b"p1", mask=MASK),
            encode_frame(Opcode.CONTINUATION, b"", fin=False, mask=MASK),
            encode_frame(Opcode.PONG, b"ignored", mask=MASK),
            encode_frame(Opcode.CONTINUATION, b"two-", fin=False, mask=MASK),
            encode_frame(Opcode.PING, b"", mask=MASK),
            encode_frame(Opcode.CONTINUATION, b"three", fin=True, mask=MASK),
            encode_frame(Opcode.BINARY, b"next", mask=MASK),
        ]
    )
    conn = WebsockConnection()
    evs = events(conn, wire)
    assert evs == [
        Data(b"one-", False),
        Ping(b"p1"),
        Data(b"", False),
        Pong(b"ignored"),
        Data(b"two-", False),
        Ping(b""),
        Data(b"three", True),
        Data(b"next", True),
    ]
    assert not conn.in_message


def test_fragmented_sending_uses_continuation_frames() -> None:
    client = WebsockConnection(Role.CLIENT)
    wire = b"".join(
        b"".join(client.send_data(p, fin=f))
        for p, f in [(b"a", False), (b"b", False), (b"c", True)]
    )
    opcodes = []
    pos = 0
    for _ in range(3):
        opcodes.append((wire[pos] & 0x0F, bool(wire[pos] & 0x80)))
        pos += 2 + 4 + (wire[pos + 1] & 0x7F)
    assert opcodes == [(2, False), (0, False), (0, True)]
    evs = events(WebsockConnection(Role.SERVER), wire)
    assert payload_of(evs) == b"abc"
    assert [e.message_finished for e in evs if isinstance(e, Data)] == [False, False, True]


@pytest.mark.parametrize(
    "wire,code,message",
    [
        (encode_frame(Opcode.BINARY, b"x"), 1002, "must be masked"),
        (encode_frame(Opcode.TEXT, b"hi", mask=MASK), 1003, "unsupported opcode: 0x01"),
        (encode_frame(Opcode.TEXT, b"hi", fin=False, mask=MASK), 1008, "only binary"),
        (encode_frame(0x3, b"", mask=MASK), 1003, "unsupported opcode: 0x03"),
        (encode_frame(0xB, b"", mask=MASK), 1003, "unsupported opcode: 0x0b"),
        (encode_frame(Opcode.BINARY, b"x", mask=MASK, rsv=4), 1002, "reserved bits"),
        (encode_frame(Opcode.PING, b"x" * 126, mask=MASK), 1002, "control frame is too large"),
        (encode_frame(Opcode.PING, b"x", fin=False, mask=MASK), 1002, "fragmented"),
        (encode_frame(Opcode.CLOSE, b"", fin=False, mask=MASK), 1002, "fragmented"),
        (encode_frame(Opcode.CONTINUATION, b"x", mask=MASK), 1002, "continuation"),
        (
            encode_frame(Opcode.BINARY, b"a", fin=False, mask=MASK)
            + encode_frame(Opcode.BINARY, b"b", mask=MASK),
            1002,
            "inside a fragmented message",
        ),
        (b"\x82\xff" + struct.pack("!Q", 1 << 63) + MASK, 1002, "most significant bit"),
        (encode_frame(Opcode.CLOSE, b"\x03", mask=MASK), 1002, "1-byte payload"),
        (encode_frame(Opcode.CLOSE, struct.pack("!H", 1005), mask=MASK), 1002, "code 1005"),
        (encode_frame(Opcode.CLOSE, struct.pack("!H", 999), mask=MASK), 1002, "code 999"),
        (encode_frame(Opcode.CLOSE, struct.pack("!H", 5000), mask=MASK), 1002, "code 5000"),
        (encode_frame(Opcode.CLOSE, b"\x03\xe8\xff\xfe", mask=MASK), 1007, "UTF-8"),
    ],
)
def test_protocol_errors_and_their_close_codes(wire: bytes, code: int, message: str) -> None:
    err = protocol_error(wire)
    assert err.code == code
    assert message in str(err)
    assert err.reason and len(err.reason.encode()) <= 123
    assert isinstance(err, ChannelError)


def test_data_before_an_error_is_delivered_first() -> None:
    conn = WebsockConnection()
    conn.receive_data(encode_frame(Opcode.BINARY, b"good", mask=MASK) + encode_frame(2, b"bad"))
    assert conn.next_event() == Data(b"good", True)
    with pytest.raises(WebsockProtocolError, match="masked"):
        conn.next_event()


def test_a_client_refuses_masked_frames() -> None:
    assert protocol_error(encode_frame(2, b"x", mask=MASK), Role.CLIENT).code == 1002


def test_control_frame_payload_may_be_125_bytes() -> None:
    evs = events(WebsockConnection(), encode_frame(Opcode.PING, b"p" * 125, mask=MASK))
    assert evs == [Ping(b"p" * 125)]


# ---- framing: close and end-of-file ----------------------------------------------------------


def test_close_then_everything_after_it_is_ignored() -> None:
    conn = WebsockConnection()
    wire = (
        encode_frame(Opcode.CLOSE, struct.pack("!H", 1001) + "bye ✓".encode(), mask=MASK)
        + b"garbage that is not a frame"
    )
    assert events(conn, wire) == [Close(1001, "bye ✓")]
    assert conn.state is StreamState.CLOSED
    assert events(conn, b"more garbage") == []
    assert events(conn, eof=True) == [EndOfStream()]
    assert events(conn) == []
    assert conn.state is StreamState.ENDED


def test_close_without_status() -> None:
    assert events(WebsockConnection(), encode_frame(Opcode.CLOSE, mask=MASK)) == [Close(None, "")]


def test_eof_between_frames_is_a_clean_end() -> None:
    conn = WebsockConnection()
    assert events(conn, encode_frame(2, b"x", mask=MASK), eof=True) == [
        Data(b"x", True),
        EndOfStream(),
    ]


@pytest.mark.parametrize("cut", [1, 2, 5, 7, 8])
def test_eof_inside_a_frame_is_an_error_without_close_code(cut: int) -> None:
    wire = encode_frame(Opcode.BINARY, b"abcd", mask=MASK)
    conn = WebsockConnection()
    got = events(conn, wire[:cut])
    with pytest.raises(WebsockProtocolError, match="end-of-file in the middle") as info:
        events(conn, eof=True)
    assert info.value.code is None
    assert payload_of(got) == b"abcd"[: max(0, cut - 6)]


def test_send_close_codes_and_truncated_reason() -> None:
    server = WebsockConnection()
    frame = server.send_close(1000, "é" * 100)
    assert frame[0] == 0x88 and frame[1] <= 125
    close = events(WebsockConnection(Role.CLIENT), frame)[0]
    assert isinstance(close, Close) and close.code == 1000
    assert close.reason == "é" * 61, "cut on a character boundary"
    assert server.close_sent
    with pytest.raises(ValueError):
        server.send_data(b"after close")
    with pytest.raises(ValueError):
        WebsockConnection().send_ping(b"x" * 126)
    assert WebsockConnection().send_close(None) == b"\x88\x00"


# ---- against a reference implementation: websockets' sans-IO client ------------------------------


def open_reference_client() -> tuple[ClientProtocol, WebsockConnection]:
    client = ClientProtocol(
        parse_uri("ws://localhost/"), subprotocols=[Subprotocol("binary")], max_size=None
    )
    client.send_request(client.connect())
    ev = handshake(b"".join(client.data_to_send()))
    assert isinstance(ev, Accepted)
    client.receive_data(ev.response)
    client.events_received()
    return client, WebsockConnection(Role.SERVER)


def test_reference_client_frames_decode_and_ours_satisfy_it() -> None:
    client, server = open_reference_client()
    big = os.urandom(100_000)
    client.send_binary(big[:70_000], fin=False)
    client.send_ping(b"are you there")
    client.send_continuation(big[70_000:], fin=True)
    client.send_binary(b"small")
    evs = events(server, b"".join(client.data_to_send()))
    assert payload_of(evs) == big + b"small"
    assert [e for e in evs if not isinstance(e, Data)] == [Ping(b"are you there")]
    # Our answers, parsed by the reference.
    for piece in server.send_data(b"reply" * 30_000):
        client.receive_data(piece)
    client.receive_data(server.send_pong(b"are you there"))
    frames = [f for f in client.events_received() if isinstance(f, Frame)]
    assert [f.opcode for f in frames] == [WsOpcode.BINARY, WsOpcode.PONG]
    assert bytes(frames[0].data) == b"reply" * 30_000
    assert bytes(frames[1].data) == b"are you there"
    # Client-initiated close: we echo its status, it is satisfied.
    client.send_close(1000, "done")
    evs = events(server, b"".join(client.data_to_send()))
    assert evs == [Close(1000, "done")]
    client.receive_data(server.send_close(1000))
    assert client.state is WsState.CLOSING
    client.receive_eof()  # we close the TCP connection after the close handshake
    assert client.state is WsState.CLOSED
    assert client.close_code == 1000
    assert client.close_exc.__class__.__name__ == "ConnectionClosedOK"


def test_reference_client_sees_our_protocol_error_close() -> None:
    client, server = open_reference_client()
    client.send_text(b"text is refused")
    with pytest.raises(WebsockProtocolError) as info:
        events(server, b"".join(client.data_to_send()))
    client.receive_data(server.send_close(info.value.code, info.value.reason))
    client.receive_eof()
    assert client.close_code == 1003
    assert client.close_reason == "only binary, close, ping, and pong frames are supported"


# ---- property tests ---------------------------------------------------------------------------


frames_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("data"), st.binary(max_size=300), st.integers(1, 3)),
        st.tuples(st.just("ping"), st.binary(max_size=125), st.just(1)),
        st.tuples(st.just("pong"), st.binary(max_size=125), st.just(1)),
    ),
    max_size=12,
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=frames_strategy,
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=20),
    mask=st.binary(min_size=4, max_size=4),
)
def test_any_chunking_gives_the_same_events(
    frames: list[tuple[str, bytes, int]], cuts: list[int], mask: bytes
) -> None:
    """Valid traffic (fragmented messages with control frames inside) split anywhere."""
    client = WebsockConnection(Role.CLIENT, mask_source=lambda n: mask)
    wire = b""
    expect_payload = b""
    expect_control: list[Event] = []
    for kind, payload, parts in frames:
        if kind == "data":
            pieces = chunked(payload, range(0, len(payload), max(1, len(payload) // parts)))
            pieces = pieces or [b""]
            for i, piece in enumerate(pieces):
                wire += b"".join(client.send_data(piece, fin=i == len(pieces) - 1))
            expect_payload += payload
        elif kind == "ping":
            wire += client.send_ping(payload)
            expect_control.append(Ping(payload))
        else:
            wire += client.send_pong(payload)
            expect_control.append(Pong(payload))
    wire += client.send_close(1000, "end")
    expect_control.append(Close(1000, "end"))

    server = WebsockConnection(Role.SERVER)
    got: list[Event] = []
    for piece in chunked(wire, cuts):
        got += events(server, piece)
    got += events(server, eof=True)
    assert payload_of(got) == expect_payload
    assert [e for e in got if not isinstance(e, Data | EndOfStream)] == expect_control
    assert got[-1] == EndOfStream()
    whole = events(WebsockConnection(Role.SERVER), wire, eof=True)
    assert payload_of(whole) == expect_payload


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(max_size=2000),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
    role=st.sampled_from([Role.SERVER, Role.CLIENT]),
    eof=st.booleans(),
)
def test_random_bytes_only_raise_websock_protocol_error(
    data: bytes, cuts: list[int], role: Role, eof: bool
) -> None:
    conn = WebsockConnection(role)
    try:
        for piece in chunked(data, cuts):
            for ev in events(conn, piece):
                assert isinstance(ev, Data | Ping | Pong | Close | EndOfStream)
        if eof:
            events(conn, eof=True)
            assert conn.state in (StreamState.ENDED, StreamState.CLOSED)
    except WebsockProtocolError as e:
        assert e.code in (None, 1002, 1003, 1007, 1008)
        assert conn.state is StreamState.ERROR
