"""Bad input, property-tested: every parser of untrusted bytes raises only its documented error.

Each parser gets pure random bytes and, mostly, mutations of REAL valid input
(the synthetic 7.2 streams of ``tests/test_wire.py``, valid websocket frames
and upgrade requests, the test PKI's PEM files): bit flips, byte and be32
overwrites with boundary values, deletions, insertions, splices from other
valid inputs (duplicated sections, foreign packets) and truncations, fed in
arbitrary chunkings.  Properties:

* only the documented error escapes (:class:`WireError`, :class:`WebsockProtocolError`,
  :class:`HandshakeError`, :class:`TLSCredsError`, :class:`InspectError`), never
  an "internal walker error" (the walkers turn their own bugs into that);
* errors are sticky and point inside the input;
* the outcome does not depend on the chunking (the walkers promise it);
* unmutated input is accepted whole (so the oracles can fail).

The ``check_*`` oracles are plain functions: ``benchmarks/fuzz_parsers.py``
runs them for minutes on a seeded mutation loop.  Example counts are set
explicitly on each test (``max_examples``); the module runs in well under a
minute on the 2-core machine.  The last section sends bad input over real
loopback sockets to an in-process recorder.
"""

from __future__ import annotations

import atexit
import base64
import json
import re
import shutil
import tempfile
import uuid as uuidlib
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet import endpoints
from twisted.internet.address import IPv4Address
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs

from qiotwisted.channel._wsproto import (
    NEED_DATA,
    Accepted,
    Close,
    Data,
    EndOfStream,
    HandshakeError,
    Opcode,
    Ping,
    Pong,
    Role,
    ServerHandshake,
    WebsockConnection,
    WebsockProtocolError,
    encode_frame,
)
from qiotwisted.crypto import TLSCreds
from qiotwisted.crypto.creds import TLSCredsError, parse_priority
from qiotwisted.migration.inspect import InspectError, inspect_path, render_text
from qiotwisted.migration.wire import (
    MULTIFD_FLAG_SYNC,
    MULTIFD_INIT_SIZE,
    ChannelKind,
    MainStreamWalker,
    MultifdInit,
    MultifdStreamWalker,
    WireError,
    check_multifd,
    classify,
    classify_reason,
    rewrite_multifd_uuid,
)
from tests.pki import TestPKI, get_test_pki
from tests.test_wire import (
    BLOCKS,
    PAGE,
    UUID,
    be16,
    be32,
    be64,
    build_multifd,
    build_stream,
    config_subsection,
    configuration,
    mf_packet,
)

# -- settings and mutations --------------------------------------------------------------------


def fuzz(examples: int) -> Callable[[Any], Any]:
    """Hypothesis settings for this module: *examples* examples, the same ones on every run.

    Derandomized, so CI is reproducible (a failure is the same failure on
    every machine); ``benchmarks/fuzz_parsers.py`` explores beyond.
    """
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


# Boundary values for length and count fields (be32 overwrites).
INTERESTING = (
    0,
    1,
    2,
    0x7E,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0xFFFF,
    0x10000,
    PAGE,
    PAGE - 1,
    PAGE + 1,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFF,
    0x11223344,  # the multifd magic
    0x5145564D,  # QEVM
)

# (op, position, argument, argument): see mutate().
Op = tuple[int, int, int, int]
N_OPS = 8
ops_strategy = st.lists(
    st.tuples(
        st.integers(0, N_OPS - 1),
        st.integers(min_value=0, max_value=1 << 24),
        st.integers(0, 255),
        st.integers(0, 1 << 20),
    ),
    min_size=1,
    max_size=6,
)
cuts_strategy = st.lists(st.integers(min_value=1, max_value=6000), max_size=24)


def structural_offsets(data: bytes, run: int = PAGE) -> list[int]:
    """Offsets of *data* outside long runs of one byte value (page payloads).

    Most of a synthetic stream is page fill, where a mutation changes
    nothing; mutations aimed at these offsets hit headers, lengths and names.
    """
    keep = bytearray(b"\x01") * len(data)
    for m in re.finditer(rb"(.)\1{%d,}" % (run - 1), data, re.DOTALL):
        keep[m.start() + 1 : m.end() - 1] = bytes(m.end() - m.start() - 2)
    return [i for i, k in enumerate(keep) if k]


def mutate(
    base: bytes, ops: Sequence[Op], donors: Sequence[bytes], hot: Sequence[int] = ()
) -> bytes:
    """Apply *ops* to *base*; odd positions aim at *hot* offsets when given.

    ops: 0 bit flip, 1 byte set, 2 delete up to 64 bytes, 3 insert a run,
    4 splice a piece of a donor (another valid input, or this one: a
    duplicated item), 5 truncate, 6 overwrite a be32 with a boundary value,
    7 overwrite a be16/u8 length with a boundary value.
    """
    d = bytearray(base)
    for op, pos, a, b in ops:
        n = len(d)
        if hot and pos & 1 and n:
            i = hot[(pos >> 1) % len(hot)] % n
        else:
            i = pos % (n + 1)
        if op == 0 and n:
            d[i % n] ^= 1 << (a & 7)
        elif op == 1 and n:
            d[i % n] = a
        elif op == 2:
            del d[i : i + 1 + b % 64]
        elif op == 3:
            d[i:i] = bytes([a]) * (1 + b % 16)
        elif op == 4 and donors:
            donor = donors[a % len(donors)]
            j = b % max(1, len(donor))
            d[i:i] = donor[j : j + 1 + (b >> 7) % 2048]
        elif op == 5:
            del d[i:]
        elif op == 6:
            d[i : i + 4] = be32(INTERESTING[a % len(INTERESTING)])
        elif op == 7:
            v = INTERESTING[a % len(INTERESTING)]
            d[i : i + 2] = be16(v & 0xFFFF) if b & 1 else bytes([v & 0xFF, (v >> 8) & 0xFF])
    return bytes(d)


def chunks_of(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """*data* split at the sizes in *cuts* (the rest in one piece); never an empty piece."""
    out = []
    pos = 0
    for c in cuts:
        if pos >= len(data):
            break
        out.append(data[pos : pos + c])
        pos += c
    if pos < len(data):
        out.append(data[pos:])
    return out


# -- oracles: migration wire format --------------------------------------------------------------

Walker = MainStreamWalker | MultifdStreamWalker


def walk_outcome(make: Callable[[], Walker], data: bytes, cuts: Sequence[int]) -> tuple[Any, ...]:
    """Feed *data* in the given chunking, then EOF; check the contract; return what was seen.

    Raises AssertionError (or the stray exception itself) when a property fails.
    """
    w = make()
    raised: WireError | None = None
    try:
        for piece in chunks_of(data, cuts):
            w.feed(piece)
        w.feed(b"")
    except WireError as e:
        raised = e
    if raised is not None:
        assert "internal walker error" not in raised.message, raised
        assert raised.offset is None or 0 <= raised.offset <= len(data), (raised, len(data))
        assert w.error is raised and w.problem is raised
        w.feed(b"more")  # sticky: ignored, no second error
        w.feed(b"")
        assert w.error is raised
    problem = w.problem
    assert problem is None or isinstance(problem, WireError)
    if problem is not None:
        assert "internal walker error" not in problem.message, problem
        assert problem.offset is None or 0 <= problem.offset <= len(data), (problem, len(data))
    reason = w.reason
    assert reason is None or isinstance(reason, str)
    summary = w.summary()
    json.dumps(summary)
    # bytes_fed stops where the error was found, which depends on the chunking.
    summary.pop("bytes")
    if raised is not None:
        summary.pop("reason")
    if isinstance(w, MainStreamWalker):
        assert w.complete == (problem is None)
        assert isinstance(w.expected, str)
        devices = [(d.idstr, d.section_id, d.size, d.offset) for d in w.devices]
        return (
            None if raised is None else (raised.message, raised.offset),
            None if problem is None else (problem.message, problem.offset),
            summary,
            devices,
        )
    assert w.ok == (problem is None)
    return (
        None if raised is None else (raised.message, raised.offset),
        None if problem is None else (problem.message, problem.offset),
        summary,
    )


def check_walker(make: Callable[[], Walker], data: bytes, cuts: Sequence[int]) -> tuple[Any, ...]:
    """The contract, and the same outcome for one feed, *cuts*, and small pieces of the head."""
    whole = walk_outcome(make, data, [])
    chunked = walk_outcome(make, data, cuts)
    assert chunked == whole, (whole, chunked)
    # Byte-by-byte through the first structural part, then the rest in one go.
    tiny = walk_outcome(make, data, [1] * min(len(data), 300))
    assert tiny == whole, (whole, tiny)
    return whole


def check_classify(head: bytes) -> None:
    try:
        kind = classify(head)
    except WireError as e:
        assert len(head) < 4 and head[:2] != b"\x16\x03", head
        assert e.offset == 0
    else:
        assert isinstance(kind, ChannelKind)
        # Only the first four bytes count.
        assert classify(head[:4] + b"\xff" * 8) is kind
        if len(head) >= 4:
            assert (kind is ChannelKind.MAIN) == (head[:4] == b"QEVM")
    reason = classify_reason(head)
    assert isinstance(reason, str) and reason


def check_multifd_init(data: bytes) -> None:
    try:
        init = MultifdInit.parse(data)
    except WireError as e:
        assert e.offset is not None and 0 <= e.offset <= len(data)
        with pytest.raises(WireError):
            rewrite_multifd_uuid(data, UUID)
        return
    assert len(data) >= MULTIFD_INIT_SIZE
    assert init.to_bytes() == data[:MULTIFD_INIT_SIZE]  # nothing is lost or normalised
    new = rewrite_multifd_uuid(data, UUID)
    assert len(new) == len(data) and new[8:24] == UUID.bytes
    assert new[:8] == data[:8] and new[24:] == data[24:]


# -- corpora (built once) -------------------------------------------------------------------------


def _main_bases() -> list[tuple[bytes, dict[str, Any]]]:
    """Valid main streams and the walker options they are valid under."""
    s = build_stream(parts=2)
    ram_at = len(b"QEVM" + be32(3) + configuration())
    cmd = b"\x08" + be16(2) + be16(4) + be32(7) + b"\x08" + be16(1) + be16(0)
    subs = (
        config_subsection("configuration/target-page-bits", be32(12))
        + config_subsection("configuration/capabilities", be32(2) + b"\x03x-a\x04x-bc")
        + config_subsection("configuration/uuid", UUID.bytes)
    )
    end_marker = b"\x03" + be32(2)
    at = s.data.index(end_marker) + len(end_marker)
    extra = be64(2 * PAGE | 0x40) + b"\x06pc.ram" + b"\x01" + be16(3) + b"abc"
    extra += be64(3 * PAGE | 0x100 | 0x20) + be32(5) + b"zzzzz"
    return [
        (s.data, {}),
        (s.data[:ram_at] + cmd + s.data[ram_at:at] + extra + s.data[at:], {}),
        (build_stream(config=configuration(subsections=subs)).data, {}),
        (build_stream(with_vmdesc=False).data, {"expect_vmdesc": False}),
    ]


MAIN_BASES = _main_bases()
MAIN_HOT = [structural_offsets(data) for data, _ in MAIN_BASES]
MF_BASES = [
    build_multifd(3, channel_id=0),
    MultifdInit.build(UUID, 1)
    + mf_packet(flags=MULTIFD_FLAG_SYNC, pages_alloc=16)
    + mf_packet([PAGE], pages_alloc=16, packet_num=1),
    MultifdInit.build(UUID, 2)
    + mf_packet([0, PAGE], flags=1 << 1, next_size=10, payload=b"z" * 10)
    + mf_packet(flags=(1 << 1) | MULTIFD_FLAG_SYNC, next_size=10, packet_num=1),
]
MF_HOT = [structural_offsets(data) for data in MF_BASES]
DONORS = [data for data, _ in MAIN_BASES] + MF_BASES


def _main_maker(kw: dict[str, Any]) -> Callable[[], Walker]:
    return lambda: MainStreamWalker(**kw)


def test_unmutated_bases_are_complete_under_any_chunking() -> None:
    """The oracles' baseline: every corpus entry is valid, so a mutation can make a difference."""
    for data, kw in MAIN_BASES:
        raised, problem, summary, _ = check_walker(_main_maker(kw), data, [7, 4096, 1, 13])
        assert raised is None and problem is None and summary["complete"], summary
    for data in MF_BASES:
        raised, problem, summary = check_walker(MultifdStreamWalker, data, [63, 1, 1344])
        assert raised is None and problem is None and summary["ok"], summary
    assert all(
        len(hot) < len(data) // 3 for hot, (data, _) in zip(MAIN_HOT, MAIN_BASES, strict=True)
    )


def capture_qemu_streams(workdir: Path) -> tuple[list[bytes], list[bytes]]:
    """Real 7.2 streams, captured by a stdlib sink: (main streams, multifd channel prefixes).

    A whole main stream of a zero-RAM 16 MiB guest (every page a zero-page
    record, real device sections and VM description); then a multifd
    migration of a random-RAM guest: its main stream (small: the pages travel
    on multifd), that stream's header spliced onto its real tail, and the
    first packets of each multifd channel.
    """
    from tests.qemu import qemu_source, stdlib_sink

    mains: list[bytes] = []
    multifd: list[bytes] = []
    with (
        qemu_source(workdir / "zero", ram_mib=16, fill="zero") as src,
        stdlib_sink(workdir / "zero-cap") as sink,
    ):
        src.set_capabilities()
        src.set_parameters()
        src.migrate(f"tcp:127.0.0.1:{sink.port}")
        assert src.wait_migration(timeout=60)["status"] == "completed"
        sink.wait_connections_closed(1, timeout=30)
        mains.append(sink.files[0].read_bytes())
    with (
        qemu_source(workdir / "rand", ram_mib=16, seed=1) as src,
        stdlib_sink(workdir / "rand-cap") as sink,
    ):
        src.set_capabilities(multifd=True)
        src.set_parameters(multifd_channels=2)
        src.migrate(f"tcp:127.0.0.1:{sink.port}")
        assert src.wait_migration(timeout=60)["status"] == "completed"
        sink.wait_connections_closed(3, timeout=30)
        for path in sink.files:
            data = path.read_bytes()
            if data[:4] == b"QEVM":
                mains.append(data[: 256 << 10])  # a prefix: the real RAM section's start
                mains.append(data[:64] + data[-(96 << 10) :])  # header + the real tail (spliced)
            else:
                multifd.append(data[: 3 * 1344 + 64 + 128 * 4096])
    return mains, multifd


@pytest.mark.qemu
def test_real_qemu_streams_and_their_mutations(tmp_path: Path) -> None:
    """Streams of a real QEMU 7.2 are complete; 300 seeded mutations of them hold the contract."""
    import random

    mains, multifd = capture_qemu_streams(tmp_path)
    whole_main = walk_outcome(MainStreamWalker, mains[0], [])
    assert whole_main[0] is None and whole_main[2]["complete"], whole_main
    assert whole_main[2]["zero_pages"] > 0 and whole_main[3], "real device sections"
    assert walk_outcome(MainStreamWalker, mains[1], [])[2]["complete"]
    for data in multifd:
        assert walk_outcome(MultifdStreamWalker, data, [])[0] is None
    rng = random.Random(20261123)
    hot = [structural_offsets(d) for d in mains + multifd]
    for k in range(300):
        which = k % len(hot)
        base = (mains + multifd)[which]
        ops = [
            (
                rng.randrange(N_OPS),
                rng.randrange(1 << 24),
                rng.randrange(256),
                rng.randrange(1 << 20),
            )
            for _ in range(rng.randint(1, 4))
        ]
        data = mutate(base, ops, mains + multifd, hot[which])
        cuts = [rng.randint(1, 70000) for _ in range(rng.randint(0, 12))]
        make = MainStreamWalker if which < len(mains) else MultifdStreamWalker
        check_walker(make, data, cuts)


# -- properties: migration wire format ------------------------------------------------------------


@fuzz(300)
@given(st.binary(max_size=12))
@example(b"\x16\x03")
@example(b"\x16")
@example(b"QEVM")
@example(b"GET ")
def test_classify_any_bytes(head: bytes) -> None:
    check_classify(head)


@fuzz(300)
@given(
    st.one_of(
        st.binary(max_size=80),
        st.builds(
            lambda ops, k: mutate(MultifdInit.build(UUID, k), ops, MF_BASES),
            ops_strategy,
            st.integers(0, 255),
        ),
    )
)
def test_multifd_init_any_bytes(data: bytes) -> None:
    check_multifd_init(data)


@fuzz(250)
@given(st.binary(max_size=600), st.sampled_from(range(4)), cuts_strategy)
def test_main_walker_random_bytes_after_valid_prefixes(
    tail: bytes, prefix_kind: int, cuts: list[int]
) -> None:
    """Random bytes after 0, 8, config-long and ram-header-long valid prefixes."""
    base = MAIN_BASES[0][0]
    ram_hdr = base.index(b"\x01" + be32(2) + b"\x03ram")
    prefix_len = (0, 8, ram_hdr, ram_hdr + 19 + 8)[prefix_kind]
    check_walker(MainStreamWalker, base[:prefix_len] + tail, cuts)


@fuzz(450)
@given(st.sampled_from(range(len(MAIN_BASES))), ops_strategy, cuts_strategy)
def test_main_walker_mutated_valid_streams(which: int, ops: list[Op], cuts: list[int]) -> None:
    data, kw = MAIN_BASES[which]
    check_walker(_main_maker(kw), mutate(data, ops, DONORS, MAIN_HOT[which]), cuts)


@fuzz(60)
@given(st.sampled_from(range(len(MAIN_BASES))), st.data())
def test_main_walker_truncations(which: int, draw: st.DataObject) -> None:
    """A valid stream cut anywhere is never complete, and says where it stopped."""
    data, kw = MAIN_BASES[which]
    cut = draw.draw(st.integers(0, len(data) - 1))
    cuts = draw.draw(cuts_strategy)
    raised, problem, summary, _ = check_walker(_main_maker(kw), data[:cut], cuts)
    assert raised is None, raised  # a prefix of a valid stream is not malformed
    assert problem is not None and not summary["complete"]
    message, offset = problem
    assert message.startswith(f"stream ends at byte {cut}")
    assert offset is not None and offset <= cut


@fuzz(350)
@given(
    st.sampled_from(range(len(MF_BASES))),
    ops_strategy,
    cuts_strategy,
    st.booleans(),
)
def test_multifd_walker_mutated_valid_channels(
    which: int, ops: list[Op], cuts: list[int], with_blocks: bool
) -> None:
    blocks = dict(BLOCKS) if with_blocks else None
    data = mutate(MF_BASES[which], ops, DONORS, MF_HOT[which])
    check_walker(lambda: MultifdStreamWalker(ram_blocks=blocks), data, cuts)


@fuzz(150)
@given(st.binary(max_size=1500), cuts_strategy)
def test_multifd_walker_random_packets_after_a_valid_init(tail: bytes, cuts: list[int]) -> None:
    check_walker(MultifdStreamWalker, MultifdInit.build(UUID, 0) + tail, cuts)


@fuzz(60)
@given(st.lists(st.tuples(st.integers(0, 2), ops_strategy, st.booleans()), min_size=1, max_size=4))
def test_check_multifd_on_mutated_channel_sets(channels: list[tuple[int, list[Op], bool]]) -> None:
    """check_multifd raises only WireError whatever the channels hold (ids, uuids, SYNCs)."""
    main = MainStreamWalker()
    main.feed(build_stream(parts=1).data)
    main.feed(b"")
    walkers = []
    for k, (cid, ops, intact) in enumerate(channels):
        data = build_multifd(3, channel_id=cid if not intact else k)
        if not intact:
            data = mutate(data, ops, MF_BASES, structural_offsets(data))
        w = MultifdStreamWalker()
        try:
            w.feed(data)
            w.feed(b"")
        except WireError:
            pass
        walkers.append(w)
    try:
        check_multifd(main, walkers, expected=len(walkers))
    except WireError as e:
        assert "internal" not in e.message
    else:
        ids = sorted(w.channel_id for w in walkers if w.channel_id is not None)
        assert ids == list(range(len(walkers)))


# -- properties: qio inspect ------------------------------------------------------------------


@fuzz(40)
@given(ops_strategy, ops_strategy, st.integers(0, 3))
def test_inspect_mutated_session_directories(
    main_ops: list[Op], mf_ops: list[Op], ids: int
) -> None:
    """`qio inspect` on a session of mutated files: a Report (text renders) or InspectError."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        main = build_stream(parts=1).data
        (d / "main.bin").write_bytes(mutate(main, main_ops, DONORS, structural_offsets(main)))
        for cid in range(ids):
            mf = build_multifd(3, channel_id=cid)
            (d / f"multifd-{cid}.bin").write_bytes(mutate(mf, mf_ops, DONORS, MF_HOT[0]))
        try:
            report = inspect_path(d)
        except InspectError:
            return
        assert isinstance(render_text(report), str)
        json.dumps(report.as_json())
        if report.complete:
            assert not report.problems


# -- oracles and properties: websocket ---------------------------------------------------------


def ws_outcome(role: Role, data: bytes, cuts: Sequence[int]) -> tuple[Any, ...]:
    """Feed a WebsockConnection; return (payload, controls, messages ended, error) seen.

    Data events may be split differently by different chunkings; their
    concatenation, the control events and the error may not.
    """
    conn = WebsockConnection(role)
    payload = bytearray()
    controls: list[Any] = []
    finished = 0
    error: tuple[str, int | None] | None = None
    ended = False
    pieces = [*chunks_of(data, cuts), b""]
    try:
        for piece in pieces:
            conn.receive_data(piece)
            # Bounded: every event consumes input or changes state, plus a margin.
            for _ in range(4 * len(data) + 8):
                ev = conn.next_event()
                if ev is NEED_DATA:
                    break
                if isinstance(ev, Data):
                    assert isinstance(ev.data, bytes)
                    payload += ev.data
                    finished += ev.message_finished
                elif isinstance(ev, Ping | Pong | Close):
                    controls.append(ev)
                else:
                    assert isinstance(ev, EndOfStream) and not ended
                    ended = True
            else:
                raise AssertionError("next_event never asked for more data")
    except WebsockProtocolError as e:
        error = (str(e), e.code)
        with pytest.raises(WebsockProtocolError):  # sticky
            conn.next_event()
    if error is None:
        assert ended, "EOF fed but no EndOfStream"
    return bytes(payload), controls, finished, error


def check_ws(role: Role, data: bytes, cuts: Sequence[int]) -> tuple[Any, ...]:
    whole = ws_outcome(role, data, [])
    chunked = ws_outcome(role, data, cuts)
    assert chunked == whole, (whole, chunked)
    return whole


MASK = b"\x37\xfa\x21\x3d"


def ws_stream(masked: bool) -> bytes:
    """A valid mix: a fragmented message around a ping, a pong, a 16-bit length, a close."""
    m = MASK if masked else None
    out = encode_frame(Opcode.BINARY, b"hello ", fin=False, mask=m)
    out += encode_frame(Opcode.PING, b"p", mask=m)
    out += encode_frame(Opcode.CONTINUATION, b"world", mask=m)
    out += encode_frame(Opcode.PONG, b"", mask=m)
    out += encode_frame(Opcode.BINARY, bytes(range(256)) * 2, mask=m)
    out += encode_frame(Opcode.BINARY, b"", mask=m)
    out += encode_frame(Opcode.CLOSE, be16(1000) + b"bye", mask=m)
    return out


WS_CLIENT_STREAM = ws_stream(masked=True)  # what a server receives
WS_SERVER_STREAM = ws_stream(masked=False)


def test_ws_valid_streams_are_accepted_under_any_chunking() -> None:
    for role, data in ((Role.SERVER, WS_CLIENT_STREAM), (Role.CLIENT, WS_SERVER_STREAM)):
        payload, controls, finished, error = check_ws(role, data, [1, 2, 3, 5, 8, 13])
        assert error is None
        assert payload == b"hello world" + bytes(range(256)) * 2
        assert controls == [Ping(b"p"), Pong(b""), Close(1000, "bye")]
        assert finished == 3


@fuzz(300)
@given(st.sampled_from([Role.SERVER, Role.CLIENT]), ops_strategy, cuts_strategy)
def test_ws_mutated_frames(role: Role, ops: list[Op], cuts: list[int]) -> None:
    base = WS_CLIENT_STREAM if role is Role.SERVER else WS_SERVER_STREAM
    check_ws(role, mutate(base, ops, [WS_CLIENT_STREAM, WS_SERVER_STREAM]), cuts)


@fuzz(200)
@given(st.sampled_from([Role.SERVER, Role.CLIENT]), st.binary(max_size=300), cuts_strategy)
def test_ws_random_bytes(role: Role, data: bytes, cuts: list[int]) -> None:
    check_ws(role, data, cuts)


@fuzz(100)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("data"), st.binary(max_size=70000), st.booleans()),
            st.tuples(st.just("ping"), st.binary(max_size=125), st.just(True)),
        ),
        max_size=6,
    ),
    cuts_strategy,
)
def test_ws_round_trip(messages: list[tuple[str, bytes, bool]], cuts: list[int]) -> None:
    """What a client sends, a server receives intact (lengths of every encoding)."""
    client = WebsockConnection(Role.CLIENT)
    wire = b""
    expect = b""
    open_message = False
    for kind, payload, fin in messages:
        if kind == "ping":
            wire += client.send_ping(payload)
        else:
            wire += b"".join(client.send_data(payload, fin=fin))
            expect += payload
            open_message = not fin
    if open_message:
        wire += b"".join(client.send_data(b"", fin=True))
    wire += client.send_close(1000, "done")
    payload, controls, _, error = check_ws(Role.SERVER, wire, cuts)
    assert error is None and payload == expect
    assert controls[-1] == Close(1000, "done")


REQUEST = (
    b"GET / HTTP/1.1\r\n"
    b"Host: 127.0.0.1:5700\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: keep-alive, Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Protocol: binary\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"\r\n"
)


def handshake_outcome(data: bytes, cuts: Sequence[int]) -> tuple[Any, ...]:
    hs = ServerHandshake(clock=lambda: 1_700_000_000.0)
    result: Any = None
    for piece in [*chunks_of(data, cuts), b""]:
        hs.receive_data(piece)
        try:
            ev = hs.next_event()
        except HandshakeError as e:
            assert e.status in (None, 400, 403, 404), e.status
            if e.status is not None:
                assert e.response.startswith(b"HTTP/1.1 %d " % e.status)
                assert e.response.endswith(b"\r\n\r\n")
            else:
                assert e.response == b""
            with pytest.raises(HandshakeError):  # sticky
                hs.next_event()
            return ("error", str(e), e.status, e.response)
        if isinstance(ev, Accepted):
            assert result is None, "Accepted twice"
            assert ev.response.startswith(b"HTTP/1.1 101 ")
            result = ("accepted", ev.request, ev.subprotocol, ev.response)
        else:
            assert ev is NEED_DATA
    assert result is not None, "EOF without a verdict"
    return (*result, hs.trailing_data)


def check_handshake(data: bytes, cuts: Sequence[int]) -> tuple[Any, ...]:
    whole = handshake_outcome(data, [])
    chunked = handshake_outcome(data, cuts)
    assert chunked == whole, (whole, chunked)
    return whole


def test_valid_upgrade_request_is_accepted_under_any_chunking() -> None:
    out = check_handshake(REQUEST + b"\x82\x80abcd", [1] * 40 + [3, 17])
    assert out[0] == "accepted" and out[2] == "binary" and out[-1] == b"\x82\x80abcd"


header_lines = [line + b"\r\n" for line in REQUEST.split(b"\r\n")[1:-2]]


@fuzz(250)
@given(
    st.one_of(
        st.builds(
            lambda ops: mutate(REQUEST, ops, [REQUEST, *header_lines, b"\r\n\r\n"]),
            ops_strategy,
        ),
        st.builds(
            lambda picks, junk: (
                b"GET / HTTP/1.1\r\n"
                + b"".join(header_lines[k % len(header_lines)] for k in picks)
                + junk
                + b"\r\n"
            ),
            st.lists(st.integers(0, 40), max_size=40),
            st.binary(max_size=30),
        ),
        st.binary(max_size=200),
    ),
    cuts_strategy,
)
def test_upgrade_request_mutations(data: bytes, cuts: list[int]) -> None:
    check_handshake(data, cuts)


# -- properties: TLS credentials in QEMU's layout -------------------------------------------------

CRED_FILES = (
    "ca-cert.pem",
    "server-cert.pem",
    "server-key.pem",
    "client-cert.pem",
    "client-key.pem",
    "ca-crl.pem",
    "dh-params.pem",
)
_PEM = re.compile(rb"(-----BEGIN [A-Z0-9 ]+-----\r?\n)(.*?)(-----END [A-Z0-9 ]+-----)", re.DOTALL)
_pki_root = Path(tempfile.mkdtemp(prefix="qiot-fuzz-pki-"))
atexit.register(shutil.rmtree, _pki_root, True)


def fuzz_pki() -> TestPKI:
    """The test PKI, made once for this module (hypothesis tests cannot take fixtures)."""
    return get_test_pki(_pki_root)


def mutate_pem(pem: bytes, ops: Sequence[Op], donors: Sequence[bytes], der: bool) -> bytes:
    """Mutate the DER inside each PEM armour (*der*) or the file's raw bytes."""
    if not der:
        return mutate(pem, ops, donors)

    def inner(m: re.Match[bytes]) -> bytes:
        try:
            raw = base64.b64decode(m.group(2))
        except ValueError:
            return m.group(0)
        body = base64.encodebytes(mutate(raw, ops, ()))
        return m.group(1) + body + m.group(3)

    return _PEM.sub(inner, pem, count=1)


def check_creds(files: dict[str, bytes], endpoint: str, **kw: Any) -> TLSCreds | None:
    """Write *files* in QEMU's layout and load them: TLSCreds or TLSCredsError, nothing else."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name, data in files.items():
            (d / name).write_bytes(data)
        try:
            return TLSCreds.load_sync(d, endpoint, **kw)
        except TLSCredsError as e:
            assert str(e)
            return None


@fuzz(200)
@given(
    st.sampled_from(CRED_FILES),
    ops_strategy,
    st.booleans(),
    st.sampled_from(["server", "client"]),
    st.booleans(),
)
def test_creds_mutated_pem_files(
    target: str, ops: list[Op], der: bool, endpoint: str, sanity: bool
) -> None:
    pki = fuzz_pki()
    files = {p.name: p.read_bytes() for p in pki.full_dir.iterdir()}
    donors = list(files.values())
    base = files.get(target) or files["ca-cert.pem"]
    files[target] = mutate_pem(base, ops, donors, der)
    check_creds(files, endpoint, sanity_check=sanity)


@fuzz(60)
@given(
    st.dictionaries(st.sampled_from(CRED_FILES), st.binary(max_size=200), max_size=4),
    st.sampled_from(["server", "client"]),
)
def test_creds_random_files(files: dict[str, bytes], endpoint: str) -> None:
    check_creds(files, endpoint)


@fuzz(200)
@given(st.text(max_size=60))
@example("NORMAL:-VERS-ALL")
@example("NORMAL:+VERS-TLS1.0")
@example(":")
def test_priority_strings(text: str) -> None:
    try:
        parse_priority(text)
    except TLSCredsError as e:
        assert str(e)


def _der_edit(pem: bytes, edit: Callable[[bytearray], None]) -> bytes:
    m = _PEM.search(pem)
    assert m is not None
    der = bytearray(base64.b64decode(m.group(2)))
    edit(der)
    return m.group(1) + base64.encodebytes(bytes(der)) + m.group(3) + b"\n"


def _retag_issuer(tag: int) -> Callable[[bytearray], None]:
    """Give the issuer's CN string another ASN.1 tag: cryptography parses names lazily."""

    def edit(der: bytearray) -> None:
        cn = b"qiotwisted test CA"
        at = der.index(bytes([len(cn)]) + cn) - 1  # the first one is the issuer
        der[at] = tag

    return edit


def _bad_public_key(der: bytearray) -> None:
    at = der.index(b"\x03\x42\x00\x04")  # BIT STRING: an uncompressed P-256 point
    der[at + 3] = 0x09  # no such point encoding: cryptography decodes it lazily


def _bad_version(der: bytearray) -> None:
    at = der.index(b"\xa0\x03\x02\x01\x02")  # [0] EXPLICIT INTEGER 2 (v3)
    der[at + 4] = 6


# Found by the fuzzers: corrupt certificates whose errors escaped load_sync as
# ValueError (lazily parsed names, "Invalid key"), TypeError, cryptography's
# InvalidVersion or OpenSSL.crypto.Error.
CORRUPT_CERTS = {
    "leaf-bad-version": ("server-cert.pem", _bad_version),
    "ca-bad-version": ("ca-cert.pem", _bad_version),
    "leaf-issuer-context-tag": ("server-cert.pem", _retag_issuer(0x8C)),
    "leaf-issuer-bitstring-tag": ("server-cert.pem", _retag_issuer(0x03)),
    "ca-issuer-context-tag": ("ca-cert.pem", _retag_issuer(0x8C)),
    "leaf-bad-public-key": ("server-cert.pem", _bad_public_key),
}


@pytest.mark.parametrize("sanity", [True, False], ids=["sanity", "no-sanity"])
@pytest.mark.parametrize("case", sorted(CORRUPT_CERTS))
def test_creds_corrupt_certificates_fail_with_tls_creds_error(case: str, sanity: bool) -> None:
    pki = fuzz_pki()
    files = {p.name: p.read_bytes() for p in pki.server_dir.iterdir()}
    name, edit = CORRUPT_CERTS[case]
    files[name] = _der_edit(files[name], edit)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for fname, data in files.items():
            (d / fname).write_bytes(data)
        with pytest.raises(TLSCredsError, match=re.escape(name)):
            TLSCreds.load_sync(d, "server", sanity_check=sanity)


# -- refusals over real sockets (in-process recorder, synthetic streams) ------------------------


class Rig:
    """NetListener + Recorder on 127.0.0.1, optionally with TLS (TLSUpgrade, as twistd does)."""

    def __init__(self, reactor: Any, output: Path, tls: Any = None) -> None:
        from qiotwisted.listener import NetListener
        from qiotwisted.migration.recorder import Recorder

        self.reactor = reactor
        self.recorder = Recorder(output, reactor=reactor, classify_timeout=2, tls=tls)
        self.listener = NetListener(reactor=reactor, name="test-fuzz")
        self.listener.set_client_func(self.recorder.client_func)
        self.port = 0

    async def open(self) -> None:
        (address,) = await self.listener.open("tcp:0:interface=127.0.0.1")
        assert isinstance(address, IPv4Address)
        self.port = address.port

    async def close(self) -> None:
        await self.listener.disconnect()
        await self.recorder.stop()

    async def connect(self) -> Any:
        from qiotwisted.channel import SocketChannel

        ch = SocketChannel(reactor=self.reactor)
        ep = endpoints.TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port)
        await endpoints.connectProtocol(ep, ch.protocol)
        return ch

    def stored(self) -> list[Path]:
        out = self.recorder.output
        return (
            sorted(p for p in out.iterdir() if not p.name.startswith(".qio"))
            if out.exists()
            else []
        )


def _tls_upgrade(pki: TestPKI, reactor: Any) -> Any:
    from qiotwisted.crypto import PRIORITY_QEMU_RECEIVER
    from qiotwisted.migration._tlsup import TLSUpgrade

    return TLSUpgrade(
        pki.server_dir,
        endpoint="server",
        priority=PRIORITY_QEMU_RECEIVER,
        handshake_timeout=2.0,
        reactor=reactor,
    )


@pytest_twisted.async_yield_fixture
async def tls_rig(reactor: Any, tmp_path: Path) -> AsyncIterator[Rig]:
    rig = Rig(reactor, tmp_path / "rec", tls=_tls_upgrade(fuzz_pki(), reactor))
    await rig.open()
    yield rig
    await rig.close()


@pytest_twisted.async_yield_fixture
async def plain_rig(reactor: Any, tmp_path: Path) -> AsyncIterator[Rig]:
    rig = Rig(reactor, tmp_path / "rec")
    await rig.open()
    yield rig
    await rig.close()


@pytest.mark.timeout_s(20)
@pytest.mark.parametrize(
    "payload",
    [
        build_stream().data[:4096],  # plaintext migration to a TLS port
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        bytes(range(256)) * 4,
        b"\x16\x03\x01\x00\x05hello",  # a "ClientHello" that is not one
    ],
    ids=["plain-migration", "http", "random", "fake-client-hello"],
)
async def test_tls_port_refuses_non_tls_and_stores_nothing(tls_rig: Rig, payload: bytes) -> None:
    with capturedLogs() as events:
        ch = await tls_rig.connect()
        await ch.write_all(payload)
        # The TLS server may answer with an alert; it must then close on us.
        for _ in range(64):  # bounded: a few alert records at most
            if not await ch.read(65536):
                break
        else:
            raise AssertionError("the TLS port kept the connection open")
        await ch.close()
        for _ in range(100):  # bounded: until the refusal is logged
            if any("TLS handshake failed" in str(e.get("log_format", "")) for e in events):
                break
            await deferLater(tls_rig.reactor, 0.02)
    refusals = [e for e in events if "refused" in str(e.get("log_format", ""))]
    assert refusals, [e.get("log_format") for e in events]
    assert "TLS handshake failed" in refusals[0]["log_format"]
    assert tls_rig.stored() == []


@pytest.mark.timeout_s(20)
async def test_tls_port_stalled_client_hello_times_out_and_stores_nothing(tls_rig: Rig) -> None:
    """Half a ClientHello, then silence: the handshake timeout (2 s here) closes it."""
    with capturedLogs() as events:
        ch = await tls_rig.connect()
        await ch.write_all(bytes.fromhex("160301020001"))
        assert await ch.read(65536) == b""  # closed by the server, after the timeout
        await ch.close()
        for _ in range(100):  # bounded: the log line follows the close
            if any("refused" in str(e.get("log_format", "")) for e in events):
                break
            await deferLater(tls_rig.reactor, 0.02)
    text = " ".join(str(e.get("error", "")) for e in events if "refused" in e.get("log_format", ""))
    assert "timed out" in text, [(e.get("log_format"), e.get("error")) for e in events]
    assert tls_rig.stored() == []


async def _send(rig: Rig, data: bytes) -> None:
    ch = await rig.connect()
    await ch.write_all(data)
    await ch.close()


async def _until_joined(rig: Rig, ids: set[int]) -> None:
    """Wait (bounded) until the open sessions hold multifd channels *ids*: arrival order."""
    for _ in range(250):
        if set().union(*(s.multifd_ids for s in rig.recorder.open_sessions)) >= ids:
            return
        await deferLater(rig.reactor, 0.02)
    raise AssertionError(f"multifd channels {ids} never joined a session")


@pytest.mark.timeout_s(20)
async def test_duplicate_multifd_id_is_refused_and_not_stored(plain_rig: Rig) -> None:
    s = build_stream(parts=1)
    filed = plain_rig.recorder.next_session()
    with capturedLogs() as events:
        main = await plain_rig.connect()
        await _send(plain_rig, build_multifd(s.ram_sections, channel_id=0))
        await _send(plain_rig, build_multifd(s.ram_sections, channel_id=1))
        await _until_joined(plain_rig, {0, 1})
        dup = build_multifd(s.ram_sections, channel_id=1)
        dup = dup[:100] + b"\xee" * 64 + dup[164:]  # a different channel 1 (content must not land)
        await _send(plain_rig, dup)
        for _ in range(100):  # bounded: until the refusal is logged
            if any("already set up" in str(e.get("log_format", "")) for e in events):
                break
            await deferLater(plain_rig.reactor, 0.02)
        await main.write_all(s.data)
        await main.close()
        path, status = await filed
    refusals = [e for e in events if "already set up" in str(e.get("log_format", ""))]
    assert refusals and refusals[0]["id"] == 1
    assert status == "complete"
    assert (path / "multifd-1.bin").read_bytes() == build_multifd(s.ram_sections, channel_id=1)
    assert sorted(p.name for p in path.iterdir() if p.suffix == ".bin") == [
        "main.bin",
        "multifd-0.bin",
        "multifd-1.bin",
    ]


@pytest.mark.timeout_s(20)
async def test_multifd_id_out_of_range_makes_the_session_incomplete(plain_rig: Rig) -> None:
    """Channel ids must be 0..N-1 (QEMU refuses an id >= multifd-channels): id 7 of 2."""
    s = build_stream(parts=1)
    filed = plain_rig.recorder.next_session()
    main = await plain_rig.connect()
    await _send(plain_rig, build_multifd(s.ram_sections, channel_id=0))
    await _send(plain_rig, build_multifd(s.ram_sections, channel_id=7))
    await main.write_all(s.data)
    await main.close()
    path, status = await filed
    manifest = json.loads((path / "manifest.json").read_text())
    assert status == "incomplete"
    assert "[0, 7]" in manifest["reason"] and "0..1" in manifest["reason"], manifest["reason"]


@pytest.mark.timeout_s(20)
@pytest.mark.parametrize("stray_first", [True, False], ids=["stray-first", "stray-last"])
async def test_multifd_with_a_foreign_uuid_does_not_join_the_migration(
    plain_rig: Rig, stray_first: bool
) -> None:
    """A multifd channel whose uuid is not the session's is kept out of it.

    The real migration (main + channel 0) is filed complete without it,
    whether the stray channel came before or after the real one; the stray
    channel, for which no main channel ever comes, is filed apart as
    incomplete (nothing received is lost).
    """
    s = build_stream(parts=1)
    foreign = rewrite_multifd_uuid(build_multifd(s.ram_sections, channel_id=1), uuidlib.uuid4())
    filed = plain_rig.recorder.next_session()
    main = await plain_rig.connect()
    order = [(foreign, 1), (build_multifd(s.ram_sections, channel_id=0), 0)]
    for data, cid in order if stray_first else reversed(order):
        await _send(plain_rig, data)
        await _until_joined(plain_rig, {cid})
    await main.write_all(s.data)
    await main.close()
    path, status = await filed
    manifest = json.loads((path / "manifest.json").read_text())
    assert status == "complete", manifest
    assert sorted(p.name for p in path.iterdir() if p.suffix == ".bin") == [
        "main.bin",
        "multifd-0.bin",
    ]
    stray_path, stray_status = await plain_rig.recorder.next_session()
    assert stray_status == "incomplete" and stray_path != path
    assert (stray_path / "multifd-1.bin").read_bytes() == foreign
