"""Reactor-free tests of the sans-IO migration wire format on synthetic streams.

The builders below write streams the way QEMU 7.2 does (checked against real
7.2 captures in test_qemu_harness.py); every error path is checked with the
offset it reports.
"""

from __future__ import annotations

import json
import struct
import uuid as uuidlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qiotwisted.errors import QIOError
from qiotwisted.migration.wire import (
    MULTIFD_FLAG_SYNC,
    MULTIFD_FLAG_ZLIB,
    MULTIFD_MAGIC,
    MULTIFD_VERSION,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    ChannelKind,
    MainStreamWalker,
    MigCommand,
    MultifdInit,
    MultifdStreamWalker,
    RamBlock,
    RamFlag,
    SectionType,
    WireError,
    check_multifd,
    classify,
    classify_reason,
    multifd_header_size,
    rewrite_multifd_uuid,
)

PAGE = 4096


def be16(v: int) -> bytes:
    return struct.pack(">H", v)


def be32(v: int) -> bytes:
    return struct.pack(">I", v)


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


# -- main stream builders ------------------------------------------------------------------


def header(version: int = QEMU_VM_FILE_VERSION, magic: int = QEMU_VM_FILE_MAGIC) -> bytes:
    return be32(magic) + be32(version)


def configuration(name: str = "pc-i440fx-7.2", subsections: bytes = b"") -> bytes:
    return bytes([SectionType.CONFIGURATION]) + be32(len(name)) + name.encode() + subsections


def config_subsection(name: str, body: bytes, version: int = 1) -> bytes:
    return bytes([SectionType.SUBSECTION, len(name)]) + name.encode() + be32(version) + body


def section_header(
    kind: int, sid: int, idstr: str = "", instance: int = 0, version: int = 1
) -> bytes:
    if kind in (SectionType.PART, SectionType.END):
        return bytes([kind]) + be32(sid)
    raw = idstr.encode()
    return bytes([kind]) + be32(sid) + bytes([len(raw)]) + raw + be32(instance) + be32(version)


def footer(sid: int) -> bytes:
    return bytes([SectionType.FOOTER]) + be32(sid)


def mem_size(blocks: Sequence[tuple[str, int]]) -> bytes:
    total = sum(size for _, size in blocks)
    out = be64(total | RamFlag.MEM_SIZE)
    for name, size in blocks:
        out += bytes([len(name)]) + name.encode() + be64(size)
    return out


def page(offset: int, block: str | None = None, fill: int = 0xA5) -> bytes:
    flags = RamFlag.PAGE | (0 if block else RamFlag.CONTINUE)
    name = bytes([len(block)]) + block.encode() if block else b""
    return be64(offset | flags) + name + bytes([fill]) * PAGE


def zero(offset: int, block: str | None = None) -> bytes:
    flags = RamFlag.ZERO | (0 if block else RamFlag.CONTINUE)
    name = bytes([len(block)]) + block.encode() if block else b""
    return be64(offset | flags) + name + b"\x00"


def eos() -> bytes:
    return be64(RamFlag.EOS)


@dataclass
class Device:
    idstr: str
    sid: int
    payload: bytes
    instance: int = 0
    version: int = 1


def vmdesc_json(devices: Iterable[Device]) -> bytes:
    entries = [
        {
            "name": d.idstr,
            "instance_id": d.instance,
            "vmsd_name": d.idstr,
            "version": d.version,
            "fields": [{"name": "data", "type": "buffer", "size": len(d.payload)}],
        }
        for d in devices
    ]
    return json.dumps({"page_size": PAGE, "devices": entries}).encode()


def vmdesc(devices: Iterable[Device]) -> bytes:
    raw = vmdesc_json(devices)
    return bytes([SectionType.EOF, SectionType.VMDESCRIPTION]) + be32(len(raw)) + raw


BLOCKS = [("pc.ram", 4 * PAGE), ("pc.bios", 2 * PAGE)]
DEVICES = [
    Device("timer", 0, bytes(24)),
    # A payload that contains this section's footer pattern followed by
    # bytes that are not a plausible next section: the scan must skip it.
    Device("cpu", 5, b"\x01\x02" + footer(5) + b"\xff\xee" + footer(5) + b"\x04" + bytes(9)),
    Device("0000:00:01.3/piix4_pm", 6, bytes(range(40)), version=3),
]


@dataclass
class Stream:
    """A small valid 7.2-like main stream and what the walker must find in it."""

    data: bytes
    normal_pages: int
    zero_pages: int
    ram_sections: int
    devices: list[Device] = field(default_factory=list)


def build_stream(
    *,
    devices: Sequence[Device] = DEVICES,
    with_vmdesc: bool = True,
    parts: int = 1,
    config: bytes | None = None,
) -> Stream:
    ram = 2
    out = header() + (configuration() if config is None else config)
    out += section_header(SectionType.START, ram, "ram", 0, 4) + mem_size(BLOCKS) + eos()
    out += footer(ram)
    normal = zeros = 0
    for k in range(parts):
        out += section_header(SectionType.PART, ram)
        out += page(0, "pc.ram", fill=k) + page(PAGE) + zero(2 * PAGE) + page(3 * PAGE)
        normal += 3
        zeros += 1
        out += eos() + footer(ram)
    out += section_header(SectionType.END, ram)
    out += zero(0, "pc.bios") + page(PAGE, "pc.bios") + eos() + footer(ram)
    normal += 1
    zeros += 1
    for d in devices:
        out += section_header(SectionType.FULL, d.sid, d.idstr, d.instance, d.version)
        out += d.payload + footer(d.sid)
    out += vmdesc(devices) if with_vmdesc else bytes([SectionType.EOF])
    return Stream(out, normal, zeros, parts + 2, list(devices))


def walk(data: bytes, chunk: int | None = None, **kw: Any) -> MainStreamWalker:
    w = MainStreamWalker(**kw)
    if chunk is None:
        w.feed(data)
    else:
        for k in range(0, len(data), chunk):
            w.feed(data[k : k + chunk])
    w.feed(b"")
    return w


def error_of(data: bytes, **kw: Any) -> WireError:
    w = MainStreamWalker(**kw)
    with pytest.raises(WireError) as info:
        w.feed(data)
    assert w.error is info.value
    assert w.problem is info.value
    return info.value


# -- constants and classify ------------------------------------------------------------------


def test_constants() -> None:
    assert QEMU_VM_FILE_MAGIC == 0x5145564D and be32(QEMU_VM_FILE_MAGIC) == b"QEVM"
    assert QEMU_VM_FILE_VERSION == 3
    assert MULTIFD_MAGIC == 0x11223344 and MULTIFD_VERSION == 1
    assert [SectionType.EOF, SectionType.START, SectionType.PART, SectionType.END] == [0, 1, 2, 3]
    assert SectionType.FULL == 4 and SectionType.VMDESCRIPTION == 6
    assert SectionType.CONFIGURATION == 7 and SectionType.FOOTER == 0x7E
    assert RamFlag.ZERO == 2 and RamFlag.PAGE == 8 and RamFlag.CONTINUE == 0x20
    assert RamFlag.EOS == 0x10 and RamFlag.MEM_SIZE == 4 and RamFlag.COMPRESS_PAGE == 0x100
    assert MigCommand.PACKAGED == 7 and MigCommand.RECV_BITMAP == 10
    assert multifd_header_size(128) == 1344
    assert issubclass(WireError, QIOError)


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"QEVM", ChannelKind.MAIN),
        (b"QEVM\x00\x00\x00\x03", ChannelKind.MAIN),
        (be32(MULTIFD_MAGIC), ChannelKind.MULTIFD),
        (b"\x16\x03\x01\x02", ChannelKind.TLS_CLIENT_HELLO),
        (b"\x16\x03", ChannelKind.TLS_CLIENT_HELLO),
        (b"GET / HTTP/1.1", ChannelKind.HTTP),
        (b"POST", ChannelKind.HTTP),
        (b"HEAD", ChannelKind.HTTP),
        (b"PUT ", ChannelKind.HTTP),
        (b"OPTIONS", ChannelKind.HTTP),
        (b"CONNECT", ChannelKind.HTTP),
        (b"SSH-2.0", ChannelKind.UNKNOWN),
        (b"\x00\x00\x00\x00", ChannelKind.UNKNOWN),
        (b"\x16\x04\x00\x00", ChannelKind.UNKNOWN),
    ],
)
def test_classify(head: bytes, kind: ChannelKind) -> None:
    assert classify(head) is kind
    assert classify_reason(head)


def test_classify_reasons() -> None:
    assert "TLS ClientHello (16 03 01 00)" in classify_reason(b"\x16\x03\x01\x00")
    assert "tls-creds" in classify_reason(b"\x16\x03\x01\x00")
    assert "HTTP request ('GET ')" in classify_reason(b"GET /")
    assert classify_reason(b"abcd") == "not a migration stream: unknown channel magic 61 62 63 64"
    assert "need 4 bytes" in classify_reason(b"QE")


@pytest.mark.parametrize("head", [b"", b"Q", b"QEV", b"\x16"])
def test_classify_too_short(head: bytes) -> None:
    with pytest.raises(WireError, match=f"got {len(head)}"):
        classify(head)


# -- multifd init packet ---------------------------------------------------------------------

UUID = uuidlib.UUID("9e4dd298-8925-44ec-b758-036618cf01fe")


def test_multifd_init_build_parse() -> None:
    raw = MultifdInit.build(UUID, 3)
    assert len(raw) == 64
    assert raw[:8] == be32(MULTIFD_MAGIC) + be32(1)
    assert raw[8:24] == UUID.bytes and raw[24] == 3 and raw[25:] == bytes(39)
    init = MultifdInit.parse(raw)
    assert init == MultifdInit(uuid=UUID, channel_id=3)
    assert init.to_bytes() == raw
    assert MultifdInit.build(str(UUID), 3) == raw == MultifdInit.build(UUID.bytes, 3)
    # parse uses the first 64 bytes of a longer buffer
    assert MultifdInit.parse(raw + b"rest").channel_id == 3


@pytest.mark.parametrize(
    ("raw", "message", "offset"),
    [
        (b"\x11\x22\x33\x44" + bytes(10), "is 64 bytes, got 14", 14),
        (
            be32(0x5145564D) + be32(1) + bytes(56),
            "received packet magic 5145564d expected 11223344",
            0,
        ),
        (be32(MULTIFD_MAGIC) + be32(2) + bytes(56), "received packet version 2 expected 1", 4),
    ],
)
def test_multifd_init_errors(raw: bytes, message: str, offset: int) -> None:
    with pytest.raises(WireError) as info:
        MultifdInit.parse(raw)
    assert message in info.value.message
    assert info.value.offset == offset


def test_multifd_init_build_errors() -> None:
    with pytest.raises(WireError, match="does not fit"):
        MultifdInit.build(UUID, 256)
    with pytest.raises(WireError, match="invalid uuid"):
        MultifdInit.build("not-a-uuid", 0)
    with pytest.raises(WireError, match="16 bytes"):
        MultifdInit.build(b"short", 0)


def test_rewrite_multifd_uuid() -> None:
    odd = bytearray(MultifdInit.build(bytes(16), 1))
    odd[40] = 0x99  # unused bytes are kept as they were
    stream = bytes(odd) + b"packets follow"
    new = uuidlib.uuid4()
    out = rewrite_multifd_uuid(stream, new)
    assert len(out) == len(stream)
    assert out[8:24] == new.bytes
    assert out[:8] == stream[:8] and out[24:] == stream[24:]
    assert MultifdInit.parse(out).uuid == new
    assert rewrite_multifd_uuid(out, str(UUID))[8:24] == UUID.bytes
    with pytest.raises(WireError, match="magic"):
        rewrite_multifd_uuid(b"QEVM" + bytes(60), new)


# -- main stream: valid streams ---------------------------------------------------------------


def test_walk_complete_stream() -> None:
    s = build_stream(parts=2)
    w = walk(s.data)
    assert w.complete and w.problem is None and w.reason is None
    assert w.version == 3 and w.machine_type == "pc-i440fx-7.2"
    assert w.ram_blocks == [RamBlock(n, size) for n, size in BLOCKS]
    assert w.ram_total == sum(size for _, size in BLOCKS)
    assert w.ram_section_id == 2
    assert w.normal_pages == s.normal_pages and w.zero_pages == s.zero_pages
    assert w.ram_sections == s.ram_sections == 4
    assert w.section_footers is True
    assert w.eof_marker
    assert [(d.idstr, d.section_id, d.size) for d in w.devices] == [
        (d.idstr, d.sid, len(d.payload)) for d in DEVICES
    ]
    assert w.vmdesc is not None and len(w.vmdesc["devices"]) == len(DEVICES)
    summary = w.summary()
    json.dumps(summary)
    assert summary["complete"] is True and summary["devices"] == 3
    assert summary["ram_sections"] == 4 and summary["machine_type"] == "pc-i440fx-7.2"


def test_walk_incremental_state_before_eof() -> None:
    s = build_stream()
    w = MainStreamWalker()
    w.feed(s.data[:-10])
    assert not w.complete and w.problem is None
    assert w.reason is not None and "stream still open" in w.reason
    assert "VM description" in w.expected
    w.feed(s.data[-10:])
    assert w.complete and w.expected.startswith("nothing more")
    w.feed(b"")
    assert w.complete


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 8, 9, 100, 4095, 4096, 4104, 4105, 65536])
def test_chunking_gives_the_same_result(chunk: int) -> None:
    s = build_stream(parts=3)
    whole = walk(s.data)
    w = walk(s.data, chunk)
    assert w.complete
    assert w.summary() == whole.summary()
    assert [d.size for d in w.devices] == [d.size for d in whole.devices]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=1, max_value=9000), min_size=1, max_size=40))
def test_random_chunking(sizes: list[int]) -> None:
    s = build_stream(parts=2)
    w = MainStreamWalker()
    pos = k = 0
    while pos < len(s.data):
        n = sizes[k % len(sizes)]
        w.feed(s.data[pos : pos + n])
        pos += n
        k += 1
    w.feed(b"")
    assert w.complete
    assert w.summary() == walk(s.data).summary()


def test_pending_stays_small() -> None:
    """Page data is skipped, never buffered: what is kept between feeds stays tiny."""
    s = build_stream(parts=4)
    w = MainStreamWalker()
    biggest = 0
    for k in range(0, len(s.data), 1000):
        w.feed(s.data[k : k + 1000])
        biggest = max(biggest, len(w._pending))
    assert w.complete
    assert biggest < 300


def test_accepts_bytearray_and_memoryview() -> None:
    s = build_stream()
    w = MainStreamWalker()
    half = len(s.data) // 2
    w.feed(bytearray(s.data[:half]))
    w.feed(memoryview(s.data)[half:])
    w.feed(b"")
    assert w.complete


def test_no_configuration_section() -> None:
    s = build_stream(config=b"")
    w = walk(s.data)
    assert w.complete and w.machine_type is None


def test_configuration_subsections() -> None:
    subs = (
        config_subsection("configuration/target-page-bits", be32(12))
        + config_subsection("configuration/capabilities", be32(2) + b"\x03x-a\x04x-bc")
        + config_subsection("configuration/uuid", UUID.bytes)
    )
    w = walk(build_stream(config=configuration(subsections=subs)).data)
    assert w.complete
    assert w.target_page_bits == 12
    assert w.capabilities == ["x-a", "x-bc"]
    assert w.source_uuid == UUID


def test_x_ignore_shared_block_entries_carry_an_address() -> None:
    caps = config_subsection("configuration/capabilities", be32(1) + b"\x0fx-ignore-shared")
    data = header() + configuration(subsections=caps) + RAM_HDR
    data += be64(2 * PAGE | RamFlag.MEM_SIZE) + b"\x01a" + be64(PAGE) + be64(0xC0000)
    data += b"\x01b" + be64(PAGE) + be64(0) + eos() + footer(2)
    data += section_header(SectionType.END, 2) + page(0, "b") + eos() + footer(2)
    w = walk(data + vmdesc([]))
    assert w.complete, w.reason
    assert w.ram_blocks == [RamBlock("a", PAGE), RamBlock("b", PAGE)]


def test_without_vmdesc_when_not_expected() -> None:
    s = build_stream(with_vmdesc=False)
    assert walk(s.data, expect_vmdesc=False).complete
    # Byte by byte too: the last device footer is only confirmed at EOF.
    assert walk(s.data, 1, expect_vmdesc=False).complete
    w = walk(s.data)
    assert not w.complete
    assert w.problem is not None and "VM description (0x06)" in w.problem.message


def test_commands_are_skipped() -> None:
    s = build_stream()
    ram_at = len(header() + configuration())
    cmd = bytes([SectionType.COMMAND]) + be16(MigCommand.PING) + be16(4) + be32(7)
    cmd += bytes([SectionType.COMMAND]) + be16(MigCommand.OPEN_RETURN_PATH) + be16(0)
    w = walk(s.data[:ram_at] + cmd + s.data[ram_at:])
    assert w.complete
    assert w.commands == {"PING": 1, "OPEN_RETURN_PATH": 1}


def test_xbzrle_and_compressed_pages() -> None:
    s = build_stream()
    marker = section_header(SectionType.END, 2)
    at = s.data.index(marker) + len(marker)
    extra = be64(2 * PAGE | RamFlag.XBZRLE) + bytes([6]) + b"pc.ram" + b"\x01" + be16(3) + b"abc"
    extra += be64(3 * PAGE | RamFlag.COMPRESS_PAGE | RamFlag.CONTINUE) + be32(5) + b"zzzzz"
    w = walk(s.data[:at] + extra + s.data[at:])
    assert w.complete
    assert w.xbzrle_pages == 1 and w.compressed_pages == 1


def test_iterable_device_section_is_scanned() -> None:
    """A non-RAM iterable (START/PART/END) is delimited by its footers too."""
    s = build_stream()
    ram_at = len(header() + configuration())
    it = section_header(SectionType.START, 9, "dirty-bitmap", 0, 1) + b"\x00\x7e" + footer(9)
    it += section_header(SectionType.PART, 9) + b"abc" + footer(9)
    end_at = s.data.index(section_header(SectionType.END, 2))
    tail = section_header(SectionType.END, 9) + b"" + footer(9)
    data = s.data[:ram_at] + it + s.data[ram_at:end_at] + tail + s.data[end_at:]
    w = walk(data)
    assert w.complete, w.reason
    assert w.devices[0].idstr == "dirty-bitmap"
    assert w.devices[0].section_type is SectionType.START
    assert w.ram_sections == 3


# -- main stream: every error, with its offset ------------------------------------------------


def splice(s: bytes, marker: bytes, replacement: bytes, *, nth: int = 0) -> tuple[bytes, int]:
    """Replace the nth occurrence of marker; returns (data, offset of the replacement)."""
    at = -1
    for _ in range(nth + 1):
        at = s.index(marker, at + 1)
    return s[:at] + replacement + s[at + len(marker) :], at


BASE = build_stream().data
HDR_LEN = len(header() + configuration())
RAM_HDR = section_header(SectionType.START, 2, "ram", 0, 4)


def test_error_bad_magic() -> None:
    e = error_of(b"QEMU\x00\x00\x00\x03")
    assert e.offset == 0 and "Not a migration stream" in e.message


def test_error_obsolete_version() -> None:
    e = error_of(header(version=2))
    assert e.offset == 4 and "obsolete" in e.message


def test_error_unsupported_version() -> None:
    e = error_of(header(version=4))
    assert e.offset == 4 and e.message == "Unsupported migration stream version 4"


def test_error_unknown_section_type() -> None:
    e = error_of(header() + configuration() + b"\x09")
    assert e.offset == HDR_LEN and e.message == "Unknown savevm section type 9"


def test_error_unknown_section_id() -> None:
    e = error_of(header() + configuration() + section_header(SectionType.PART, 77))
    assert e.offset == HDR_LEN and e.message == "Unknown savevm section 77"


def test_error_second_configuration() -> None:
    data = header() + configuration() + RAM_HDR + mem_size(BLOCKS) + eos() + footer(2)
    e = error_of(data + configuration())
    assert e.offset == len(data) and "configuration section after" in e.message


def test_error_machine_name_too_long() -> None:
    e = error_of(header() + b"\x07" + be32(5000))
    assert e.offset == 9 and "implausible" in e.message


def test_error_unknown_config_subsection() -> None:
    e = error_of(header() + configuration(subsections=config_subsection("configuration/x", b"")))
    assert e.offset == HDR_LEN and "unknown configuration subsection" in e.message


def test_error_invalid_idstr() -> None:
    data = header() + configuration() + section_header(SectionType.FULL, 3, "a\x01b")
    e = error_of(data)
    assert e.offset == HDR_LEN + 5 and "invalid idstr" in e.message


def test_error_full_ram_section() -> None:
    e = error_of(header() + configuration() + section_header(SectionType.FULL, 2, "ram"))
    assert e.offset == HDR_LEN and "unexpected FULL section for 'ram'" in e.message


def _ram_prefix() -> bytes:
    return header() + configuration() + RAM_HDR + mem_size(BLOCKS)


def test_error_unknown_ramblock() -> None:
    data = _ram_prefix()
    e = error_of(data + page(0, "vga.vram"))
    assert e.offset == len(data) and 'Unknown ramblock "vga.vram"' in e.message


def test_error_continue_without_block() -> None:
    data = _ram_prefix()
    e = error_of(data + page(0))
    assert e.offset == len(data) and "CONTINUE without a block" in e.message


def test_error_offset_outside_block() -> None:
    data = _ram_prefix() + page(0, "pc.ram")
    e = error_of(data + page(4 * PAGE))
    assert e.offset == len(data) and "Illegal RAM offset 0x4000 in block 'pc.ram'" in e.message
    e = error_of(_ram_prefix() + zero(2 * PAGE, "pc.bios"))
    assert "Illegal RAM offset 0x2000" in e.message


@pytest.mark.parametrize("flags", [0x200, 0x400, RamFlag.FULL, RamFlag.CONTINUE])
def test_error_unknown_flags(flags: int) -> None:
    data = _ram_prefix()
    e = error_of(data + be64(flags))
    assert e.offset == len(data) and "Unknown combination of migration flags" in e.message


def test_error_hook_record() -> None:
    data = _ram_prefix()
    e = error_of(data + be64(RamFlag.HOOK))
    assert e.offset == len(data) and "HOOK" in e.message


def test_error_eos_with_address() -> None:
    data = _ram_prefix()
    e = error_of(data + be64(PAGE | RamFlag.EOS))
    assert e.offset == len(data) and "non-zero address" in e.message


def test_error_block_list_overflow() -> None:
    data = header() + configuration() + RAM_HDR + be64(PAGE | RamFlag.MEM_SIZE)
    e = error_of(data + b"\x06pc.ram" + be64(2 * PAGE))
    assert e.offset == len(data) and "exceeds the announced total" in e.message


def test_error_block_declared_twice() -> None:
    data = header() + configuration() + RAM_HDR + be64(2 * PAGE | RamFlag.MEM_SIZE)
    data += b"\x01a" + be64(PAGE)
    e = error_of(data + b"\x01a" + be64(PAGE))
    assert e.offset == len(data) and "declared twice" in e.message


def test_error_bad_xbzrle_header() -> None:
    data = _ram_prefix() + be64(RamFlag.XBZRLE) + b"\x06pc.ram"
    e = error_of(data + b"\x02" + be16(1) + b"x")
    assert e.offset == len(data) and "wrong compression" in e.message
    e = error_of(data + b"\x01" + be16(PAGE + 1))
    assert "len overflow" in e.message


def test_error_bad_compressed_length() -> None:
    data = _ram_prefix() + be64(RamFlag.COMPRESS_PAGE) + b"\x06pc.ram"
    e = error_of(data + be32(4111))
    assert e.offset == len(data) and "Invalid compressed data length: 4111" in e.message


def test_error_missing_footer() -> None:
    # Footers are on after the first section ends with one.
    data = _ram_prefix() + eos() + footer(2) + section_header(SectionType.PART, 2) + eos()
    e = error_of(data + section_header(SectionType.PART, 2))
    assert e.offset == len(data) and e.message == "Missing section footer for ram"


def test_error_mismatched_footer() -> None:
    data = _ram_prefix() + eos()
    e = error_of(data + footer(3))
    assert e.offset == len(data) and "Mismatched section id in footer for ram" in e.message


def test_error_device_without_footers() -> None:
    data = _ram_prefix() + eos()  # no footer: this stream has none
    e = error_of(data + section_header(SectionType.FULL, 4, "timer") + bytes(8))
    assert e.offset == len(data) and "no section footers" in e.message


def test_error_vmdesc_before_eof() -> None:
    data = header() + configuration()
    e = error_of(data + b"\x06")
    assert e.offset == len(data) and "before QEMU_VM_EOF" in e.message


def test_error_footer_outside_section() -> None:
    data = header() + configuration()
    e = error_of(data + footer(2))
    assert e.offset == len(data) and "outside a section" in e.message


def test_error_unknown_command() -> None:
    data = header() + configuration()
    e = error_of(data + b"\x08" + be16(99) + be16(0))
    assert e.offset == len(data) and "unknown QEMU_VM_COMMAND 99" in e.message
    e = error_of(data + b"\x08" + be16(MigCommand.PACKAGED) + be16(4))
    assert "PACKAGED" in e.message


def _before_vmdesc() -> bytes:
    return BASE[: len(BASE) - len(vmdesc(DEVICES))]


def test_error_not_vmdesc_after_eof() -> None:
    data = _ram_prefix() + eos() + footer(2) + b"\x00"
    e = error_of(data + b"\x01")
    assert e.offset == len(data) and "expected the VM description (0x06)" in e.message


def test_implausible_item_after_last_device_footer() -> None:
    """After a device section the footer only counts if a plausible item follows it."""
    data = _before_vmdesc() + b"\x00\x01"
    w = walk(data)
    assert not w.complete
    assert w.problem is not None
    assert "ends device section 6 '0000:00:01.3/piix4_pm'" in w.problem.message
    assert w.problem.offset == data.index(
        section_header(SectionType.FULL, 6, DEVICES[2].idstr, 0, 3)
    )


# After a RAM section (parsed structurally) the vmdesc is parsed without any
# plausibility check, so its own errors show.
RAM_END = _ram_prefix() + eos() + footer(2)


def test_error_vmdesc_length() -> None:
    data = RAM_END + b"\x00\x06"
    e = error_of(data + be32(0))
    assert e.offset == len(data) and "VM description length 0" in e.message
    e = error_of(data + be32(65 << 20))
    assert "VM description length 68157440 is implausible" in e.message


def test_error_vmdesc_not_json() -> None:
    data = RAM_END
    e = error_of(data + b"\x00\x06" + be32(5) + b"{nope")
    assert e.offset == len(data) + 1 and "not valid JSON" in e.message
    e = error_of(data + b"\x00\x06" + be32(2) + b"[]")
    assert "not a JSON object" in e.message
    e = error_of(data + b"\x00\x06" + be32(2) + b"{}")
    assert "lacks page_size or devices" in e.message


def test_error_vmdesc_device_list_differs() -> None:
    data = _before_vmdesc()
    raw = vmdesc_json(DEVICES[:2])
    e = error_of(data + b"\x00\x06" + be32(len(raw)) + raw)
    assert e.offset == len(data) + 1
    assert "lists 2 devices, the stream has 3 device sections" in e.message


def test_error_vmdesc_size_differs() -> None:
    data = _before_vmdesc()
    devs = [*DEVICES[:2], Device(DEVICES[2].idstr, DEVICES[2].sid, bytes(41), version=3)]
    raw = vmdesc_json(devs)
    e = error_of(data + b"\x00\x06" + be32(len(raw)) + raw)
    dev_at = data.index(section_header(SectionType.FULL, 6, "0000:00:01.3/piix4_pm", 0, 3))
    assert e.offset == dev_at
    assert "holds 40 bytes, the VM description accounts for 41" in e.message


def test_error_data_after_end() -> None:
    e = error_of(BASE + b"\x00")
    assert e.offset == len(BASE) and "data after the end" in e.message


def test_error_is_sticky_and_later_feeds_are_ignored() -> None:
    w = MainStreamWalker()
    with pytest.raises(WireError) as info:
        w.feed(b"nope, not QEVM")
    w.feed(BASE)
    w.feed(b"")
    assert w.error is info.value and w.problem is info.value
    assert not w.complete
    assert w.reason == str(info.value) == "Not a migration stream (magic 0x6e6f7065) (at byte 0)"


def test_feed_after_eof() -> None:
    w = MainStreamWalker()
    w.feed(b"")
    with pytest.raises(WireError, match="data fed after EOF"):
        w.feed(b"x")


def test_bad_page_size() -> None:
    with pytest.raises(WireError, match="power of two"):
        MainStreamWalker(page_size=3000)


# -- truncation ---------------------------------------------------------------------------------


def test_truncation_at_every_offset() -> None:
    s = build_stream(parts=1).data
    for cut in range(len(s)):
        w = walk(s[:cut])
        assert not w.complete, cut
        p = w.problem
        assert p is not None, cut
        assert p.message.startswith(f"stream ends at byte {cut}: expected "), (cut, p)
        assert p.offset is not None and 0 <= p.offset <= cut, (cut, p)
        # It is the start of the item the cut fell in (a page record at most).
        assert cut - p.offset <= PAGE + 300, (cut, p)
    assert walk(s).complete


def test_truncation_reports_inside_a_page() -> None:
    s = build_stream().data
    at = s.index(page(0, "pc.ram", fill=0))
    w = walk(s[: at + 100])
    assert w.problem is not None and w.problem.offset == at
    assert "more bytes of a RAM page" in w.problem.message


# -- hypothesis: any input raises only WireError ---------------------------------------------------


def _feed_all(w: MainStreamWalker | MultifdStreamWalker, data: bytes, cuts: list[int]) -> None:
    pos = 0
    try:
        for c in cuts:
            w.feed(data[pos : pos + c])
            pos += c
        w.feed(data[pos:])
        w.feed(b"")
    except WireError as e:
        assert "internal" not in e.message, e
        assert e.offset is None or 0 <= e.offset <= len(data) + 1
    problem = w.problem
    assert problem is None or isinstance(problem, WireError)


chunks = st.lists(st.integers(min_value=1, max_value=50), max_size=5)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), chunks)
def test_fuzz_random_bytes_main(data: bytes, cuts: list[int]) -> None:
    _feed_all(MainStreamWalker(), data, cuts)
    _feed_all(MainStreamWalker(), header() + data, cuts)
    _feed_all(MainStreamWalker(), _ram_prefix() + data, cuts)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), chunks)
def test_fuzz_random_bytes_multifd(data: bytes, cuts: list[int]) -> None:
    _feed_all(MultifdStreamWalker(), data, cuts)
    _feed_all(MultifdStreamWalker(), MultifdInit.build(UUID, 0) + data, cuts)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=4),
    chunks,
)
def test_fuzz_mutated_valid_stream(flips: list[tuple[int, int]], cuts: list[int]) -> None:
    data = bytearray(BASE)
    for where, value in flips:
        data[where % len(data)] = value
    w = MainStreamWalker()
    _feed_all(w, bytes(data), cuts)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzz_mutated_multifd(flips: list[tuple[int, int]]) -> None:
    data = bytearray(build_multifd())
    for where, value in flips:
        data[where % len(data)] = value
    _feed_all(MultifdStreamWalker(ram_blocks=dict(BLOCKS)), bytes(data), [])


# -- multifd channel ---------------------------------------------------------------------------


def mf_packet(
    offsets: Sequence[int] = (),
    *,
    flags: int = 0,
    block: str = "pc.ram",
    packet_num: int = 0,
    pages_alloc: int = 128,
    next_size: int | None = None,
    magic: int = MULTIFD_MAGIC,
    version: int = MULTIFD_VERSION,
    payload: bytes | None = None,
) -> bytes:
    normal = len(offsets)
    nps = normal * PAGE if next_size is None else next_size
    hdr = struct.pack(">IIIIIIQ", magic, version, flags, pages_alloc, normal, nps, packet_num)
    hdr += bytes(32)
    name = block.encode() if normal else b""
    hdr += name + bytes(256 - len(name))
    offs = list(offsets) + [0] * (pages_alloc - normal)
    hdr += struct.pack(f">{pages_alloc}Q", *offs)
    assert len(hdr) == multifd_header_size(pages_alloc)
    body = bytes([0x5A]) * (normal * PAGE) if payload is None else payload
    return hdr + body


def build_multifd(syncs: int = 3, channel_id: int = 0) -> bytes:
    out = MultifdInit.build(UUID, channel_id)
    num = 0
    out += mf_packet(flags=MULTIFD_FLAG_SYNC, packet_num=num, next_size=0)
    for _ in range(syncs - 1):
        num += 1
        out += mf_packet([0, PAGE, 3 * PAGE], packet_num=num)
        num += 1
        # 7.2: a SYNC may carry pages and be followed by an empty packet of the
        # same number that repeats a stale next_packet_size.
        out += mf_packet([2 * PAGE], flags=MULTIFD_FLAG_SYNC, packet_num=num)
        out += mf_packet(packet_num=num, next_size=PAGE)
    return out


def walk_mf(data: bytes, chunk: int | None = None, **kw: Any) -> MultifdStreamWalker:
    w = MultifdStreamWalker(**kw)
    if chunk is None:
        w.feed(data)
    else:
        for k in range(0, len(data), chunk):
            w.feed(data[k : k + chunk])
    w.feed(b"")
    return w


def test_multifd_walk() -> None:
    data = build_multifd(syncs=3)
    w = walk_mf(data, ram_blocks=[RamBlock(n, s) for n, s in BLOCKS])
    assert w.ok and w.problem is None and w.reason is None
    assert w.init == MultifdInit(UUID, 0) and w.channel_id == 0
    assert w.packets == 1 + 2 * 3
    assert w.sync_packets == 3
    assert w.normal_pages == 2 * 4
    assert w.pages_alloc == 128
    assert w.is_complete(3) and not w.is_complete(4)
    s = w.summary()
    json.dumps(s)
    assert s["sync_packets"] == 3 and s["uuid"] == str(UUID) and s["ok"] is True


@pytest.mark.parametrize("chunk", [1, 63, 64, 65, 1343, 1344, 4096, 100000])
def test_multifd_chunking(chunk: int) -> None:
    data = build_multifd()
    assert walk_mf(data, chunk).summary() == walk_mf(data).summary()


def test_multifd_pages_alloc_drives_header_size() -> None:
    data = MultifdInit.build(UUID, 1)
    data += mf_packet(flags=MULTIFD_FLAG_SYNC, pages_alloc=16)
    data += mf_packet([PAGE], pages_alloc=16, packet_num=1)
    w = walk_mf(data, 5)
    assert w.ok and w.packets == 2 and w.pages_alloc == 16 and w.normal_pages == 1


def test_multifd_compressed_payload_uses_next_packet_size() -> None:
    data = MultifdInit.build(UUID, 0)
    data += mf_packet([0, PAGE], flags=MULTIFD_FLAG_ZLIB, next_size=10, payload=b"z" * 10)
    data += mf_packet(flags=MULTIFD_FLAG_ZLIB | MULTIFD_FLAG_SYNC, next_size=10, packet_num=1)
    w = walk_mf(data)
    assert w.ok and w.packets == 2 and w.normal_pages == 2 and w.sync_packets == 1


INIT = MultifdInit.build(UUID, 0)


@pytest.mark.parametrize(
    ("packet", "message", "delta"),
    [
        (mf_packet(magic=0x5145564D), "received packet magic 5145564d and expected magic", 0),
        (mf_packet(version=2), "received packet version 2 and expected version 1", 4),
        (mf_packet(flags=0x100), "unknown packet flags 0x100", 8),
        (mf_packet(flags=3 << 1), "unknown compression method", 8),
        (mf_packet(pages_alloc=1)[:12] + be32(0) + bytes(400), "received packet with size 0", 12),
        (
            mf_packet(pages_alloc=1)[:12] + be32(20000) + bytes(400),
            "received packet with size 20000",
            12,
        ),
        (
            mf_packet(pages_alloc=1)[:16] + be32(2) + bytes(400),
            "received packet with 2 pages and expected maximum pages are 1",
            16,
        ),
        (mf_packet([1]), "invalid page offset 0x1 in block pc.ram", 320),
        (mf_packet([4 * PAGE]), "invalid page offset 0x4000 in block pc.ram", 320),
        (mf_packet([0, 8 * PAGE]), "invalid page offset 0x8000 in block pc.ram", 328),
        (mf_packet([0], block="vga.vram"), "multifd: unknown ram block vga.vram", 64),
        (mf_packet([0], block="a\x01"), "invalid ram block name", 64),
    ],
)
def test_multifd_packet_errors(packet: bytes, message: str, delta: int) -> None:
    w = MultifdStreamWalker(ram_blocks=dict(BLOCKS))
    with pytest.raises(WireError) as info:
        w.feed(INIT + packet)
    assert message in info.value.message
    assert info.value.offset == 64 + delta
    assert not w.ok


def test_multifd_init_error_offsets() -> None:
    w = MultifdStreamWalker()
    with pytest.raises(WireError) as info:
        w.feed(b"QEVM\x00\x00\x00\x03" + bytes(56))
    assert info.value.offset == 0 and "expected 11223344" in info.value.message
    w = MultifdStreamWalker()
    with pytest.raises(WireError) as info:
        w.feed(be32(MULTIFD_MAGIC) + be32(9) + bytes(56))
    assert info.value.offset == 4


def test_multifd_pages_alloc_change_and_packet_num_going_back() -> None:
    data = INIT + mf_packet(flags=1, packet_num=5)
    w = MultifdStreamWalker()
    with pytest.raises(WireError) as info:
        w.feed(data + mf_packet(pages_alloc=64, packet_num=6))
    assert info.value.offset == len(data) + 12 and "pages_alloc changed" in info.value.message
    w = MultifdStreamWalker()
    with pytest.raises(WireError) as info:
        w.feed(data + mf_packet(packet_num=4))
    assert info.value.offset == len(data) + 24 and "packet_num 4 after 5" in info.value.message


def test_multifd_truncation() -> None:
    data = build_multifd(syncs=2)
    boundaries = {64}
    pos = 64
    while pos < len(data):
        alloc, normal = struct.unpack_from(">II", data, pos + 12)
        pos += multifd_header_size(alloc) + normal * PAGE
        boundaries.add(pos)
    for cut in range(0, len(data), 97):
        w = walk_mf(data[:cut])
        if cut in boundaries:
            assert w.ok and not w.is_complete(2)
            continue
        assert not w.ok
        p = w.problem
        assert p is not None and p.message.startswith(f"stream ends at byte {cut}")
        assert p.offset is not None and p.offset <= cut
        assert p.offset in boundaries or p.offset == 0
    first_data = 64 + multifd_header_size(128)
    inside = walk_mf(data[: first_data + multifd_header_size(128) + 100])
    assert inside.problem is not None and inside.problem.offset == first_data
    assert "more bytes of page data of packet #2" in inside.problem.message
    hdr = walk_mf(data[: first_data + 30])
    assert hdr.problem is not None and hdr.problem.offset == first_data
    assert "the rest of the header of packet #2" in hdr.problem.message


def test_multifd_not_eof_yet() -> None:
    w = MultifdStreamWalker()
    w.feed(build_multifd())
    assert w.ok and not w.eof and not w.is_complete(3)
    assert w.reason is not None and "stream still open" in w.reason


# -- check_multifd ---------------------------------------------------------------------------


def _complete_set(syncs: int = 3) -> tuple[MainStreamWalker, list[MultifdStreamWalker]]:
    main = walk(build_stream(parts=syncs - 2).data)
    assert main.ram_sections == syncs
    chans = [walk_mf(build_multifd(syncs, channel_id=i)) for i in range(2)]
    return main, chans


def test_check_multifd_ok() -> None:
    main, chans = _complete_set()
    check_multifd(main, chans, expected=2)
    check_multifd(main, list(reversed(chans)))


def test_check_multifd_failures() -> None:
    main, chans = _complete_set()
    with pytest.raises(WireError, match="2 multifd channels, expected 3"):
        check_multifd(main, chans, expected=3)
    short = walk_mf(build_multifd(2, channel_id=1))
    with pytest.raises(WireError, match="2 SYNC packets, the main stream has 3 ram sections"):
        check_multifd(main, [chans[0], short])
    with pytest.raises(WireError, match="appears twice"):
        check_multifd(main, [chans[0], chans[0]])
    gap = walk_mf(build_multifd(3, channel_id=5))
    with pytest.raises(WireError, match=r"are not 0\.\.1"):
        check_multifd(main, [chans[0], gap])
    other = walk_mf(rewrite_multifd_uuid(build_multifd(3, channel_id=1), uuidlib.uuid4()))
    with pytest.raises(WireError, match="different uuids"):
        check_multifd(main, [chans[0], other])
    cut = walk_mf(build_multifd(3, channel_id=1)[:-5])
    with pytest.raises(WireError, match="multifd channel #1: stream ends"):
        check_multifd(main, [chans[0], cut])
    incomplete_main = walk(build_stream().data[:-3])
    with pytest.raises(WireError, match="main channel: stream ends"):
        check_multifd(incomplete_main, chans)
