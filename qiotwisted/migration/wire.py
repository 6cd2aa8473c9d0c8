"""QEMU 7.2's live-migration wire format, sans-IO.

Nothing here does I/O, uses Twisted or keeps a reference to the caller's
buffers: objects are fed bytes (``feed(data)``; ``feed(b"")`` means EOF) and
tell what they saw.  They are not thread-safe, but hold no global state, so
each walker may live in its own worker thread.

* :func:`classify` tells what the first four bytes of an incoming connection
  are (main channel, multifd channel, a TLS ClientHello, HTTP, other).
* :class:`MultifdInit` parses and builds the 64-byte packet that opens each
  multifd channel; :func:`rewrite_multifd_uuid` changes its uuid.
* :class:`MainStreamWalker` follows the main channel structurally: header,
  configuration (machine type), sections, the RAM section's block list and
  page records, ``QEMU_VM_EOF`` and the JSON VM description.  It says
  :attr:`~MainStreamWalker.complete` only once the end marker *and* the whole
  VM description arrived (a 7.2 stream has no other end-of-stream proof, and
  TLS from 7.2 never sends close_notify).
* :class:`MultifdStreamWalker` follows one multifd channel: init packet, then
  packets walked by ``normal_pages`` (never by ``next_packet_size``, which 7.2
  repeats stale on empty SYNC packets).  :func:`check_multifd` decides whether
  a set of channels is complete: each must hold as many SYNC packets as the
  main stream has ``ram`` sections.

Device-state sections carry no length.  The walker delimits them with the
section footer (``0x7e`` + be32 section id, on for every 7.2 machine type)
that must be followed by a plausible next section header, and once the VM
description arrives it checks that the device sections it found are exactly
the ones the description lists, in order.  RAM sections are parsed record by
record; page data is skipped by length, never copied, so memory stays
O(sections) whatever the stream size.

Every malformed input raises :class:`WireError` (and nothing else) with the
absolute stream offset where the problem is.
"""

from __future__ import annotations

import enum
import json
import struct
import uuid as uuidlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import QIOError

__all__ = [
    "MULTIFD_FLAG_COMPRESSION_MASK",
    "MULTIFD_FLAG_SYNC",
    "MULTIFD_FLAG_ZLIB",
    "MULTIFD_FLAG_ZSTD",
    "MULTIFD_INIT_SIZE",
    "MULTIFD_MAGIC",
    "MULTIFD_PACKET_FIXED_SIZE",
    "MULTIFD_VERSION",
    "QEMU_VM_FILE_MAGIC",
    "QEMU_VM_FILE_VERSION",
    "QEMU_VM_FILE_VERSION_COMPAT",
    "ChannelKind",
    "DeviceSection",
    "MainStreamWalker",
    "MigCommand",
    "MultifdInit",
    "MultifdStreamWalker",
    "RamBlock",
    "RamFlag",
    "SectionType",
    "WireError",
    "check_multifd",
    "classify",
    "classify_reason",
    "multifd_header_size",
    "rewrite_multifd_uuid",
]

# -- constants (migration/savevm.h, migration/ram.c, migration/multifd.h of 7.2) --------------

QEMU_VM_FILE_MAGIC = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION = 0x00000003
QEMU_VM_FILE_VERSION_COMPAT = 0x00000002  # refused by QEMU: "SaveVM v2 format is obsolete"

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
MULTIFD_INIT_SIZE = 64
MULTIFD_FLAG_SYNC = 1 << 0
# 7.2 has three bits of compression method (NOCOMP 0, ZLIB 1<<1, ZSTD 2<<1);
# later QEMUs widened the field.
MULTIFD_FLAG_COMPRESSION_MASK = 0x7 << 1
MULTIFD_FLAG_ZLIB = 1 << 1
MULTIFD_FLAG_ZSTD = 2 << 1
# magic, version, flags, pages_alloc, normal_pages, next_packet_size (be32 x6),
# packet_num (be64), unused (4 x be64), ramblock[256]; then pages_alloc x be64 offsets.
MULTIFD_PACKET_FIXED_SIZE = 6 * 4 + 8 + 32 + 256
# 7.2 sends 128 (512 KiB / 4 KiB) and its receiver refuses more; the walker
# accepts up to 100x that (QEMU's own "magic number" for an absurd packet).
_MULTIFD_MAX_PAGES_ALLOC = 12800

DEFAULT_PAGE_SIZE = 4096  # TARGET_PAGE_SIZE of x86
_MAX_MACHINE_NAME = 1024
_MAX_VMDESC = 64 << 20


class SectionType(enum.IntEnum):
    """The byte that opens each top-level item of the main stream (``QEMU_VM_*``)."""

    EOF = 0x00
    START = 0x01
    PART = 0x02
    END = 0x03
    FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    FOOTER = 0x7E


class RamFlag(enum.IntFlag):
    """``RAM_SAVE_FLAG_*``: the low bits of each be64 address in a RAM section (7.2)."""

    FULL = 0x01  # obsolete, refused
    ZERO = 0x02
    MEM_SIZE = 0x04
    PAGE = 0x08
    EOS = 0x10
    CONTINUE = 0x20
    XBZRLE = 0x40
    HOOK = 0x80  # RDMA only
    COMPRESS_PAGE = 0x100
    # 0x200 (MULTIFD_FLUSH) only exists from QEMU 8.0 on; 7.2 refuses it.


class MigCommand(enum.IntEnum):
    """``MIG_CMD_*`` carried by ``QEMU_VM_COMMAND`` (postcopy, return path)."""

    INVALID = 0
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10


class ChannelKind(enum.Enum):
    """What the first bytes of an incoming connection are."""

    MAIN = "main"
    MULTIFD = "multifd"
    TLS_CLIENT_HELLO = "tls-client-hello"
    HTTP = "http"
    UNKNOWN = "unknown"


class WireError(QIOError):
    """Malformed or unexpected migration data.

    *offset* is the absolute byte offset in the stream (from its first byte)
    where the offending item starts, or ``None`` when it has no position.
    """

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message if offset is None else f"{message} (at byte {offset})")
        self.message = message
        self.offset = offset


_be16 = struct.Struct(">H").unpack_from
_be32 = struct.Struct(">I").unpack_from
_be64 = struct.Struct(">Q").unpack_from
_be32x6 = struct.Struct(">IIIIII").unpack_from
_pack_be32 = struct.Struct(">I").pack


# -- channel classification ----------------------------------------------------------------

_HTTP_PREFIXES = (
    b"GET ",
    b"POST",
    b"HEAD",
    b"PUT ",
    b"OPTI",
    b"CONN",
    b"DELE",
    b"PATC",
    b"TRAC",
    b"PRI ",
)


def classify(first4: bytes) -> ChannelKind:
    """Classify a connection by its first four bytes (QEMU 7.2 itself does not peek).

    Two bytes suffice to recognise a TLS ClientHello (``16 03``); anything
    else needs four.  Raises :class:`WireError` when too few bytes are given.
    """
    head = bytes(first4[:4])
    if len(head) >= 2 and head[0] == 0x16 and head[1] == 0x03:
        return ChannelKind.TLS_CLIENT_HELLO
    if len(head) < 4:
        raise WireError(f"need 4 bytes to classify a channel, got {len(head)}", 0)
    (magic,) = _be32(head, 0)
    if magic == QEMU_VM_FILE_MAGIC:
        return ChannelKind.MAIN
    if magic == MULTIFD_MAGIC:
        return ChannelKind.MULTIFD
    if head.startswith(_HTTP_PREFIXES):
        return ChannelKind.HTTP
    return ChannelKind.UNKNOWN


def classify_reason(first4: bytes) -> str:
    """A sentence for a log or a refusal: what the first bytes are and what that means."""
    try:
        kind = classify(first4)
    except WireError as e:
        return e.message
    shown = bytes(first4[:4]).hex(" ")
    if kind is ChannelKind.MAIN:
        return f"main migration channel (magic {shown})"
    if kind is ChannelKind.MULTIFD:
        return f"multifd channel (magic {shown})"
    if kind is ChannelKind.TLS_CLIENT_HELLO:
        return (
            f"TLS ClientHello ({shown}) on a plain migration endpoint: "
            "the source has tls-creds set but this endpoint does not use TLS"
        )
    if kind is ChannelKind.HTTP:
        text = bytes(first4[:4]).decode("ascii", "replace")
        return f"HTTP request ({text!r}) on a migration endpoint"
    return f"not a migration stream: unknown channel magic {shown}"


# -- multifd init packet -------------------------------------------------------------------


def _as_uuid(value: uuidlib.UUID | bytes | str) -> uuidlib.UUID:
    if isinstance(value, uuidlib.UUID):
        return value
    if isinstance(value, bytes | bytearray):
        if len(value) != 16:
            raise WireError(f"a uuid is 16 bytes, got {len(value)}")
        return uuidlib.UUID(bytes=bytes(value))
    try:
        return uuidlib.UUID(value)
    except (ValueError, TypeError, AttributeError) as e:
        raise WireError(f"invalid uuid {value!r}") from e


@dataclass(frozen=True)
class MultifdInit:
    """``MultiFDInit_t``: the 64 bytes that open a multifd channel.

    be32 magic ``0x11223344``, be32 version 1, 16 bytes uuid (the source's
    ``-uuid``; the destination refuses any other), u8 channel id, 39 unused
    bytes (kept as received so a rewrite changes nothing else).
    """

    uuid: uuidlib.UUID
    channel_id: int
    version: int = MULTIFD_VERSION
    unused: bytes = bytes(39)

    SIZE: ClassVar[int] = MULTIFD_INIT_SIZE

    @classmethod
    def parse(cls, data: bytes) -> MultifdInit:
        """Parse the first 64 bytes of *data*; :class:`WireError` names the bad field."""
        if len(data) < MULTIFD_INIT_SIZE:
            raise WireError(
                f"multifd init packet is {MULTIFD_INIT_SIZE} bytes, got {len(data)}", len(data)
            )
        magic, version = struct.unpack_from(">II", data, 0)
        if magic != MULTIFD_MAGIC:
            raise WireError(
                f"multifd: received packet magic {magic:x} expected {MULTIFD_MAGIC:x}", 0
            )
        if version != MULTIFD_VERSION:
            raise WireError(
                f"multifd: received packet version {version} expected {MULTIFD_VERSION}", 4
            )
        return cls(
            uuid=uuidlib.UUID(bytes=bytes(data[8:24])),
            channel_id=data[24],
            version=version,
            unused=bytes(data[25:64]),
        )

    @classmethod
    def build(cls, uuid: uuidlib.UUID | bytes | str, channel_id: int) -> bytes:
        """The 64 bytes QEMU 7.2 sends for channel *channel_id* of a source with *uuid*."""
        return cls(uuid=_as_uuid(uuid), channel_id=channel_id).to_bytes()

    def to_bytes(self) -> bytes:
        if not 0 <= self.channel_id <= 255:
            raise WireError(f"multifd channel id {self.channel_id} does not fit in a byte")
        if len(self.unused) != 39:
            raise WireError(f"multifd init unused part is 39 bytes, got {len(self.unused)}")
        return (
            struct.pack(">II", MULTIFD_MAGIC, self.version)
            + self.uuid.bytes
            + bytes([self.channel_id])
            + self.unused
        )


def rewrite_multifd_uuid(packet: bytes, uuid: uuidlib.UUID | bytes | str) -> bytes:
    """Return *packet* (a multifd init packet, or a channel starting with one) with a new uuid.

    Everything else, including bytes after the first 64, is kept as is; the
    packet is validated first.
    """
    MultifdInit.parse(packet)
    return bytes(packet[:8]) + _as_uuid(uuid).bytes + bytes(packet[24:])


def multifd_header_size(pages_alloc: int) -> int:
    """Bytes of a multifd packet header with room for *pages_alloc* offsets (1344 for 128)."""
    return MULTIFD_PACKET_FIXED_SIZE + 8 * pages_alloc


# -- the feeding machinery shared by both walkers ------------------------------------------

# A state handler gets (buffer, pos, end) and returns the new position, or
# None when the item at pos is not complete yet.  A position beyond end means
# "skip that many bytes of the data still to come" (page data).  Every handler
# that returns a position either advances it or changes state, so the loop
# that drives them ends.
_Handler = Callable[[Any, int, int], "int | None"]

# The longest item a handler may wait for: a section header (1+4+1+255+4+4),
# a page record header (8+1+255), a multifd packet header with the largest
# accepted pages_alloc.  Leftovers, never longer than this, are carried over
# between feeds and completed with _COMBINE more bytes of the next chunk
# (or all of it when that is not enough).
_MAX_ITEM = MULTIFD_PACKET_FIXED_SIZE + 8 * _MULTIFD_MAX_PAGES_ALLOC + 64
_COMBINE = 8192


class _Walker:
    """Buffering, skipping, offsets and error state; subclasses supply handlers."""

    def __init__(self) -> None:
        self._fed = 0  # bytes fed so far
        self._pos = 0  # absolute offset of the first byte not parsed yet (may be > _fed)
        self._pending = b""  # bytes [_pos, _fed) when _pos < _fed
        self._eof = False
        self._base = 0  # absolute offset of index 0 of the buffer being parsed
        self._item = 0  # absolute start of the item being skipped over, for truncation reports
        self._handler: _Handler = self._unreachable
        self.error: WireError | None = None

    # public ---------------------------------------------------------------------------

    @property
    def bytes_fed(self) -> int:
        """How many bytes were fed so far."""
        return self._fed

    @property
    def eof(self) -> bool:
        """Whether ``feed(b"")`` was called."""
        return self._eof

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Walk *data*, the next bytes of the stream; ``b""`` means the stream ended.

        Any chunking gives the same result.  Raises :class:`WireError` at the
        first malformed item; the error is also kept in :attr:`error` and
        later calls do nothing (so a recorder may keep storing what it
        receives).  A stream that ends early is not an error here: see
        :attr:`problem`.  ``bytes`` input is not copied, apart from a few
        KiB to complete an item split across two calls; page data is skipped.
        """
        if self.error is not None:
            return
        if self._eof:
            if data:
                self._fail(WireError("data fed after EOF", self._fed))
            return
        if not isinstance(data, bytes):
            data = bytes(data)
        try:
            if not data:
                self._eof = True
                self._end_of_stream()
                return
            self._feed(data)
        except WireError as e:
            self._fail(e)
        except Exception as e:  # a bug must still surface as a WireError for callers
            self._fail(WireError(f"internal walker error: {e!r}", self._pos))

    @property
    def problem(self) -> WireError | None:
        """Why the stream is not (yet) valid and complete, or ``None``.

        The malformed item's error; or, after EOF without completion, a
        :class:`WireError` saying where the stream stopped and what was
        expected; ``None`` while data may still come or once complete.
        """
        if self.error is not None:
            return self.error
        if self._eof and not self._is_complete():
            return self._truncation_error()
        return None

    @property
    def reason(self) -> str | None:
        """:attr:`problem` as text; while still running, what is expected next."""
        p = self.problem
        if p is not None:
            return str(p)
        if self._is_complete():
            return None
        return f"stream still open after {self._fed} bytes: expected {self.expected}"

    @property
    def expected(self) -> str:
        """What the walker waits for next, in words."""
        return self._expected()

    # machinery ------------------------------------------------------------------------

    def _fail(self, err: WireError) -> None:
        self.error = err
        self._pending = b""
        raise err

    def _feed(self, data: bytes) -> None:
        fed0 = self._fed
        n = len(data)
        self._fed = fed0 + n
        if self._pos >= self._fed:  # still skipping page data
            return
        if self._pending:
            # The leftover item [_pos, fed0) is completed with a bounded
            # prefix of data, so a big chunk is not copied for a few bytes.
            pend = self._pending
            self._pending = b""
            take = min(n, len(pend) + _COMBINE)
            combo = pend + data[:take]
            p = self._run(combo, 0, self._pos)
            if p < len(pend) and take < n:
                # An item longer than the prefix (a huge multifd header).
                combo = pend + data
                p = self._run(combo, p, self._pos)
                take = n
            self._pos += p
            if take == n:
                if p < len(combo):
                    self._pending = combo[p:]
                return
            if self._pos >= self._fed:
                return
            start = self._pos - fed0
        else:
            start = self._pos - fed0
        p = self._run(data, start, fed0)
        self._pos = fed0 + p
        if p < n:
            self._pending = data[p:]

    def _run(self, buf: bytes, pos: int, base: int) -> int:
        self._base = base
        end = len(buf)
        while pos < end:
            r = self._handler(buf, pos, end)
            if r is None:
                break
            pos = r
        return pos

    def _unreachable(self, buf: bytes, pos: int, end: int) -> int | None:
        raise WireError("walker has no state", self._base + pos)

    def _err(self, message: str, pos: int) -> WireError:
        """A WireError at buffer index *pos* of the buffer being parsed."""
        return WireError(message, self._base + pos)

    def _truncation_error(self) -> WireError:
        return WireError(
            f"stream ends at byte {self._fed}: expected {self._expected()}", self._break_offset()
        )

    def _break_offset(self) -> int:
        """Start of the item the stream ended in."""
        return self._item if self._pos > self._fed else self._pos

    # subclass hooks
    def _is_complete(self) -> bool:
        raise NotImplementedError

    def _expected(self) -> str:
        raise NotImplementedError

    def _end_of_stream(self) -> None:
        """Called once at EOF with whatever is pending; may finish the walk."""


# -- main stream ---------------------------------------------------------------------------


@dataclass
class RamBlock:
    """One RAM block as declared by the RAM section's MEM_SIZE record."""

    name: str
    size: int


@dataclass
class DeviceSection:
    """A non-RAM section seen in the stream (``QEMU_VM_SECTION_START``/``FULL``)."""

    section_type: SectionType
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    offset: int  # where its header starts
    size: int = -1  # payload bytes (between header and footer) of a FULL section, once known


@dataclass
class _Section:
    idstr: str
    instance_id: int
    version_id: int
    parts: int = 0


class _M(enum.Enum):
    """States of :class:`MainStreamWalker`."""

    HEADER = "the stream header (be32 magic QEVM, be32 version 3)"
    TOP = "a section header (type byte, section id, ...)"
    CONFIG = "the configuration section (be32 length + machine type)"
    CONFIG_SUB = "a configuration subsection or the first section"
    CONFIG_CAPS = "a capability name in the configuration"
    RAM = "a RAM record (be64 address|flags) in the ram section"
    RAM_BLOCKS = "a RAM block entry (u8 length, name, be64 size) of the MEM_SIZE record"
    FOOTER = "a section footer (0x7e + be32 section id)"
    SCAN = "the section footer that ends a device-state section"
    COMMAND = "the data of a QEMU_VM_COMMAND"
    AFTER_EOF = "the VM description (0x06) after QEMU_VM_EOF"
    VMDESC_LEN = "the be32 length of the VM description"
    VMDESC = "the JSON VM description"
    DONE = "nothing more: the stream is complete"


_PRINTABLE = frozenset(range(0x20, 0x7F))


def _printable(raw: bytes) -> bool:
    return bool(raw) and all(c in _PRINTABLE for c in raw)


class MainStreamWalker(_Walker):
    """Walks a main migration channel, incrementally, in bounded memory.

    Feed it the channel's bytes in any chunking; ``feed(b"")`` at EOF.  It
    raises :class:`WireError` for the first malformed item.  Afterwards:

    * :attr:`complete` — ``QEMU_VM_EOF`` and the whole VM description arrived
      (or, with ``expect_vmdesc=False``, ``QEMU_VM_EOF`` then EOF);
    * :attr:`problem` / :attr:`reason` — where and why it is not complete;
    * what it saw: :attr:`machine_type`, :attr:`ram_blocks`,
      :attr:`normal_pages`, :attr:`zero_pages`, :attr:`ram_sections` (START +
      PART + END of ``ram``: the SYNC count each multifd channel must have),
      :attr:`devices` (non-RAM sections), :attr:`vmdesc`.

    Thread contract: none; use one walker from one thread at a time.
    """

    def __init__(self, *, page_size: int = DEFAULT_PAGE_SIZE, expect_vmdesc: bool = True) -> None:
        super().__init__()
        # The RAM flags occupy the low 9 bits of each page address.
        if page_size < 512 or page_size & (page_size - 1):
            raise WireError(f"page size {page_size} is not a power of two >= 512")
        self.page_size = page_size
        self.expect_vmdesc = expect_vmdesc
        self._flag_mask = page_size - 1
        self.version: int | None = None
        self.machine_type: str | None = None
        self.target_page_bits: int | None = None
        self.capabilities: list[str] = []
        self.source_uuid: uuidlib.UUID | None = None
        self.ram_total: int | None = None
        self.ram_blocks: list[RamBlock] = []
        self.ram_section_id: int | None = None
        self.ram_sections = 0
        self.normal_pages = 0
        self.zero_pages = 0
        self.xbzrle_pages = 0
        self.compressed_pages = 0
        self.devices: list[DeviceSection] = []
        self.commands: dict[str, int] = {}
        self.section_footers: bool | None = None
        self.eof_marker = False
        self.vmdesc: dict[str, Any] | None = None
        self.vmdesc_size: int | None = None
        self._sections: dict[int, _Section] = {}
        self._blocks: dict[str, int] = {}
        self._block_left = 0  # MEM_SIZE bytes not yet covered by block entries
        self._cur_block: str | None = None
        self._cont_max = -1  # largest address|0x28 of a valid CONTINUE page record
        self._section_id = 0  # section being walked
        self._section_name = ""
        self._section_payload = 0  # absolute offset where its payload starts
        self._section_at = 0  # absolute offset of its header
        self._command_at = 0
        self._full_device: DeviceSection | None = None
        self._config_allowed = False
        self._caps_left = 0
        self._command_left = 0
        self._vmdesc_left = 0
        self._vmdesc_at = 0
        self._vmdesc_buf = bytearray()
        self._scan_pat = b""
        self._handlers = self._handler_table()
        self._state = _M.HEADER
        self._goto(_M.HEADER)

    # -- results ---------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """The end marker and (unless not expected) the whole VM description arrived."""
        return self.error is None and self._is_complete()

    def _is_complete(self) -> bool:
        if self._state is _M.DONE:
            return True
        return (
            not self.expect_vmdesc
            and self._eof
            and self._state is _M.AFTER_EOF
            and not self._pending
        )

    def summary(self) -> dict[str, Any]:
        """A JSON-able digest (for manifests and ``qio inspect``)."""
        return {
            "kind": "main",
            "complete": self.complete,
            "reason": self.reason,
            "bytes": self._fed,
            "version": self.version,
            "machine_type": self.machine_type,
            "ram_blocks": [{"name": b.name, "size": b.size} for b in self.ram_blocks],
            "ram_sections": self.ram_sections,
            "normal_pages": self.normal_pages,
            "zero_pages": self.zero_pages,
            "xbzrle_pages": self.xbzrle_pages,
            "compressed_pages": self.compressed_pages,
            "devices": len(self.devices),
            "commands": dict(self.commands),
            "vmdesc_bytes": self.vmdesc_size,
        }

    def _break_offset(self) -> int:
        st = self._state
        if st is _M.SCAN:
            return self._section_at
        if st is _M.VMDESC or st is _M.VMDESC_LEN:
            return self._vmdesc_at
        if st is _M.COMMAND:
            return self._command_at
        return super()._break_offset()

    def _expected(self) -> str:
        st = self._state
        if st is _M.RAM:
            if self._pos > self._fed:
                return (
                    f"{self._pos - self._fed} more bytes of a RAM page "
                    f"in section {self._section_id} 'ram'"
                )
            return f"{st.value} (section {self._section_id})"
        if st is _M.SCAN:
            return (
                f"the footer (0x7e + be32 {self._section_id}) that ends device section "
                f"{self._section_id} '{self._section_name}'"
            )
        if st is _M.FOOTER:
            return f"the footer (0x7e + be32 {self._section_id}) of section {self._section_id}"
        if st is _M.VMDESC:
            return f"{self._vmdesc_left} more bytes of the JSON VM description"
        if st is _M.COMMAND:
            return f"{self._command_left} more bytes of a QEMU_VM_COMMAND"
        return st.value

    # -- state plumbing --------------------------------------------------------------------

    def _goto(self, state: _M) -> None:
        self._state = state
        self._handler = self._handlers[state]

    def _handler_table(self) -> dict[_M, _Handler]:
        return {
            _M.HEADER: self._h_header,
            _M.TOP: self._h_top,
            _M.CONFIG: self._h_config,
            _M.CONFIG_SUB: self._h_config_sub,
            _M.CONFIG_CAPS: self._h_config_caps,
            _M.RAM: self._h_ram,
            _M.RAM_BLOCKS: self._h_ram_blocks,
            _M.FOOTER: self._h_footer,
            _M.SCAN: self._h_scan,
            _M.COMMAND: self._h_command,
            _M.AFTER_EOF: self._h_after_eof,
            _M.VMDESC_LEN: self._h_vmdesc_len,
            _M.VMDESC: self._h_vmdesc,
            _M.DONE: self._h_done,
        }

    def _end_of_stream(self) -> None:
        # A device section's footer is only accepted once the next item looks
        # plausible; at EOF there is no next item, so a pending footer ends the
        # section now and whatever follows it (a lone QEMU_VM_EOF when no VM
        # description is expected) is walked once more.
        buf = self._pending
        if self._state is _M.SCAN and buf.startswith(self._scan_pat):
            self._base = self._pos
            self._close_device(0)
            self._goto(_M.TOP)
            p = self._run(buf, 5, self._pos)
            self._pos += p
            self._pending = buf[p:]

    # -- handlers --------------------------------------------------------------------------

    def _h_header(self, buf: bytes, pos: int, end: int) -> int | None:
        if end - pos < 8:
            return None
        magic, version = struct.unpack_from(">II", buf, pos)
        if magic != QEMU_VM_FILE_MAGIC:
            raise self._err(f"Not a migration stream (magic {magic:#010x})", pos)
        if version == QEMU_VM_FILE_VERSION_COMPAT:
            raise self._err("SaveVM v2 format is obsolete and don't work anymore", pos + 4)
        if version != QEMU_VM_FILE_VERSION:
            raise self._err(f"Unsupported migration stream version {version}", pos + 4)
        self.version = version
        self._goto(_M.TOP)
        self._config_allowed = True
        return pos + 8

    def _h_top(self, buf: bytes, pos: int, end: int) -> int | None:
        r = self._top(buf, pos, end)
        if r is not None and self._state is not _M.CONFIG:
            self._config_allowed = False
        return r

    def _top(self, buf: bytes, pos: int, end: int) -> int | None:
        t = buf[pos]
        if t == SectionType.CONFIGURATION:
            if not self._config_allowed:
                raise self._err("configuration section after the first section", pos)
            self._goto(_M.CONFIG)
            return pos + 1
        if t == SectionType.START or t == SectionType.FULL:
            return self._section_start(buf, pos, end, t)
        if t == SectionType.PART or t == SectionType.END:
            if end - pos < 5:
                return None
            (sid,) = _be32(buf, pos + 1)
            sec = self._sections.get(sid)
            if sec is None:
                raise self._err(f"Unknown savevm section {sid}", pos)
            sec.parts += 1
            self._section_id = sid
            self._section_name = sec.idstr
            self._section_at = self._base + pos
            self._section_payload = self._base + pos + 5
            if sid == self.ram_section_id:
                self.ram_sections += 1
                self._goto(_M.RAM)
            else:
                self._begin_scan(pos, None)
            return pos + 5
        if t == SectionType.EOF:
            self.eof_marker = True
            self._goto(_M.AFTER_EOF)
            return pos + 1
        if t == SectionType.COMMAND:
            if end - pos < 5:
                return None
            cmd, length = struct.unpack_from(">HH", buf, pos + 1)
            try:
                name = MigCommand(cmd).name
            except ValueError:
                raise self._err(f"unknown QEMU_VM_COMMAND {cmd}", pos) from None
            if cmd == MigCommand.PACKAGED:
                raise self._err(
                    "postcopy packaged streams (MIG_CMD_PACKAGED) are not supported", pos
                )
            self.commands[name] = self.commands.get(name, 0) + 1
            self._command_left = length
            self._command_at = self._base + pos
            self._goto(_M.COMMAND if length else _M.TOP)
            return pos + 5
        if t == SectionType.VMDESCRIPTION:
            raise self._err("VM description before QEMU_VM_EOF", pos)
        if t == SectionType.FOOTER:
            raise self._err("section footer outside a section", pos)
        raise self._err(f"Unknown savevm section type {t}", pos)

    def _section_start(self, buf: bytes, pos: int, end: int, t: int) -> int | None:
        if end - pos < 6:
            return None
        (sid,) = _be32(buf, pos + 1)
        n = buf[pos + 5]
        hdr = 6 + n + 8
        if end - pos < hdr:
            return None
        raw = buf[pos + 6 : pos + 6 + n]
        if not _printable(raw):
            raise self._err(f"section {sid}: invalid idstr {raw!r}", pos + 5)
        idstr = raw.decode("ascii")
        instance_id, version_id = struct.unpack_from(">II", buf, pos + 6 + n)
        old = self._sections.get(sid)
        if old is not None and old.idstr != idstr:
            raise self._err(f"section id {sid} reused: '{idstr}' after '{old.idstr}'", pos)
        self._section_id = sid
        self._section_name = idstr
        self._section_at = self._base + pos
        self._section_payload = self._base + pos + hdr
        stype = SectionType(t)
        if idstr == "ram":
            if stype is not SectionType.START or self.ram_section_id is not None:
                raise self._err(f"unexpected {stype.name} section for 'ram'", pos)
            self.ram_section_id = sid
            self._sections[sid] = _Section(idstr, instance_id, version_id)
            self.ram_sections += 1
            self._goto(_M.RAM)
            return pos + hdr
        dev = DeviceSection(stype, sid, idstr, instance_id, version_id, self._base + pos)
        self.devices.append(dev)
        if stype is SectionType.START:
            self._sections[sid] = _Section(idstr, instance_id, version_id)
        self._begin_scan(pos, dev)
        return pos + hdr

    def _begin_scan(self, pos: int, dev: DeviceSection | None) -> None:
        if self.section_footers is False:
            raise self._err(
                f"device section '{self._section_name}' cannot be delimited: "
                "the stream has no section footers (machine type older than 2.4)",
                pos,
            )
        self._full_device = (
            dev if dev is not None and dev.section_type is SectionType.FULL else None
        )
        self._scan_pat = b"\x7e" + _pack_be32(self._section_id)
        self._goto(_M.SCAN)

    def _h_config(self, buf: bytes, pos: int, end: int) -> int | None:
        if end - pos < 4:
            return None
        (n,) = _be32(buf, pos)
        if n > _MAX_MACHINE_NAME:
            raise self._err(f"configuration: machine type length {n} is implausible", pos)
        if end - pos < 4 + n:
            return None
        raw = buf[pos + 4 : pos + 4 + n]
        self.machine_type = raw.decode("ascii", "backslashreplace")
        self._goto(_M.CONFIG_SUB)
        return pos + 4 + n

    def _h_config_sub(self, buf: bytes, pos: int, end: int) -> int | None:
        if buf[pos] != SectionType.SUBSECTION:
            self._config_allowed = False
            self._goto(_M.TOP)
            return pos
        if end - pos < 2:
            return None
        n = buf[pos + 1]
        if end - pos < 2 + n + 4:
            return None
        name = buf[pos + 2 : pos + 2 + n].decode("ascii", "backslashreplace")
        body = pos + 2 + n + 4
        if name == "configuration/target-page-bits":
            if end - body < 4:
                return None
            (self.target_page_bits,) = _be32(buf, body)
            return body + 4
        if name == "configuration/capabilities":
            if end - body < 4:
                return None
            (self._caps_left,) = _be32(buf, body)
            if self._caps_left > 255:
                raise self._err(f"configuration: {self._caps_left} capabilities", body)
            self._goto(_M.CONFIG_CAPS)
            return body + 4
        if name == "configuration/uuid":
            if end - body < 16:
                return None
            self.source_uuid = uuidlib.UUID(bytes=bytes(buf[body : body + 16]))
            return body + 16
        raise self._err(f"unknown configuration subsection '{name}'", pos)

    def _h_config_caps(self, buf: bytes, pos: int, end: int) -> int | None:
        if self._caps_left == 0:
            self._goto(_M.CONFIG_SUB)
            return pos
        n = buf[pos]
        if end - pos < 1 + n:
            return None
        self.capabilities.append(buf[pos + 1 : pos + 1 + n].decode("ascii", "backslashreplace"))
        self._caps_left -= 1
        return pos + 1 + n

    def _h_ram(self, buf: bytes, pos: int, end: int) -> int | None:
        rec = 8 + self.page_size
        fmask = self._flag_mask
        fast = RamFlag.PAGE | RamFlag.CONTINUE
        cont_max = self._cont_max
        normal = 0
        entry = start = pos
        be64 = _be64
        try:
            while end - pos >= 8:
                addr = be64(buf, pos)[0]
                # The hot path: a page of the current block, skipped by length.
                if addr & fmask == fast and addr <= cont_max:
                    normal += 1
                    start = pos
                    pos += rec
                    continue
                start = pos
                r = self._ram_record(buf, pos, end, addr)
                if r is None:
                    return pos if pos > entry else None
                if self._state is not _M.RAM:
                    return r
                pos = r
                cont_max = self._cont_max
            return pos if pos > entry else None
        finally:
            self.normal_pages += normal
            self._item = self._base + start

    def _ram_record(self, buf: bytes, pos: int, end: int, addr: int) -> int | None:
        """One RAM record that is not a CONTINUE page; None if incomplete."""
        fmask = self._flag_mask
        flags = addr & fmask
        offset = addr & ~fmask
        if flags & (RamFlag.ZERO | RamFlag.PAGE | RamFlag.COMPRESS_PAGE | RamFlag.XBZRLE):
            q = pos + 8
            if flags & RamFlag.CONTINUE:
                if self._cur_block is None:
                    raise self._err("Ack, bad migration stream! (CONTINUE without a block)", pos)
            else:
                if end - q < 1:
                    return None
                n = buf[q]
                if end - q < 1 + n:
                    return None
                name = buf[q + 1 : q + 1 + n].decode("ascii", "backslashreplace")
                if name not in self._blocks:
                    raise self._err(f'Unknown ramblock "{name}", cannot accept migration', pos)
                q += 1 + n
                self._cur_block = name
                self._cont_max = self._blocks[name] - self.page_size + 0x28
            if offset + self.page_size > self._blocks[self._cur_block]:
                raise self._err(f"Illegal RAM offset {offset:#x} in block '{self._cur_block}'", pos)
            kind = flags & ~RamFlag.CONTINUE
            if kind == RamFlag.PAGE:
                self.normal_pages += 1
                return q + self.page_size
            if kind == RamFlag.ZERO:
                if end - q < 1:
                    return None
                self.zero_pages += 1
                return q + 1
            if kind == RamFlag.XBZRLE:
                if end - q < 3:
                    return None
                xh_flags = buf[q]
                (xh_len,) = _be16(buf, q + 1)
                if xh_flags != 0x01:
                    raise self._err(
                        f"Failed to load XBZRLE page - wrong compression! ({xh_flags})", q
                    )
                if xh_len > self.page_size:
                    raise self._err(f"Failed to load XBZRLE page - len overflow! ({xh_len})", q)
                self.xbzrle_pages += 1
                return q + 3 + xh_len
            if kind == RamFlag.COMPRESS_PAGE:
                if end - q < 4:
                    return None
                (clen,) = _be32(buf, q)
                # QEMU's bound: zlib's compressBound(TARGET_PAGE_SIZE).
                page = self.page_size
                if clen > page + (page >> 12) + (page >> 14) + (page >> 25) + 13:
                    raise self._err(f"Invalid compressed data length: {clen}", q)
                self.compressed_pages += 1
                return q + 4 + clen
            raise self._err(f"Unknown combination of migration flags: {flags:#x}", pos)
        if flags == RamFlag.EOS:
            if offset:
                raise self._err(f"EOS record with a non-zero address {offset:#x}", pos)
            self._goto(_M.FOOTER)
            return pos + 8
        if flags == RamFlag.MEM_SIZE:
            self.ram_total = offset
            self._block_left = offset
            self.ram_blocks = []
            self._blocks = {}
            self._cur_block = None
            self._cont_max = -1
            self._goto(_M.RAM_BLOCKS if offset else _M.RAM)
            return pos + 8
        if flags & RamFlag.HOOK:
            raise self._err("RAM_SAVE_FLAG_HOOK (RDMA) records are not supported", pos)
        raise self._err(f"Unknown combination of migration flags: {flags:#x}", pos)

    def _h_ram_blocks(self, buf: bytes, pos: int, end: int) -> int | None:
        n = buf[pos]
        # With x-ignore-shared (announced in the configuration) each entry
        # also carries the block's guest address.
        extra = 8 if "x-ignore-shared" in self.capabilities else 0
        if end - pos < 1 + n + 8 + extra:
            return None
        raw = buf[pos + 1 : pos + 1 + n]
        if not _printable(raw):
            raise self._err(f"RAM block list: invalid block name {raw!r}", pos)
        name = raw.decode("ascii")
        (size,) = _be64(buf, pos + 1 + n)
        if size > self._block_left:
            raise self._err(
                f"RAM block '{name}' of {size:#x} bytes exceeds the announced total "
                f"({self._block_left:#x} left)",
                pos,
            )
        if name in self._blocks:
            raise self._err(f"RAM block '{name}' declared twice", pos)
        self._blocks[name] = size
        self.ram_blocks.append(RamBlock(name, size))
        self._block_left -= size
        if self._block_left == 0:
            self._goto(_M.RAM)
        return pos + 1 + n + 8 + extra

    def _h_footer(self, buf: bytes, pos: int, end: int) -> int | None:
        if self.section_footers is None:
            self.section_footers = buf[pos] == SectionType.FOOTER
        if not self.section_footers:
            self._goto(_M.TOP)
            return pos
        if end - pos < 5:
            return None
        if buf[pos] != SectionType.FOOTER:
            raise self._err(f"Missing section footer for {self._section_name}", pos)
        (sid,) = _be32(buf, pos + 1)
        if sid != self._section_id:
            raise self._err(
                f"Mismatched section id in footer for {self._section_name} -"
                f" read 0x{sid:x} expected 0x{self._section_id:x}",
                pos,
            )
        self._goto(_M.TOP)
        return pos + 5

    def _h_scan(self, buf: bytes, pos: int, end: int) -> int | None:
        pat = self._scan_pat
        while True:
            i = buf.find(pat, pos, end)
            if i < 0:
                # Keep the last 4 bytes: a footer may straddle two chunks.
                keep = max(pos, end - 4)
                return keep if keep > pos else None
            verdict = self._plausible_next(buf, i + 5, end)
            if verdict is None:
                return i if i > pos else None
            if verdict:
                self._close_device(i)
                self._goto(_M.TOP)
                return i + 5
            pos = i + 1

    def _close_device(self, i: int) -> None:
        dev = self._full_device
        if dev is not None:
            dev.size = self._base + i - self._section_payload
        self.section_footers = True

    def _plausible_next(self, buf: bytes, j: int, end: int) -> bool | None:
        """Is there a plausible next top-level item at *j*?  None: cannot tell yet."""
        if j >= end:
            return None
        t = buf[j]
        if t == SectionType.START or t == SectionType.FULL:
            if end - j < 6:
                return None
            (sid,) = _be32(buf, j + 1)
            n = buf[j + 5]
            if n == 0:
                return False
            if end - j < 6 + n + 8:
                return None
            raw = buf[j + 6 : j + 6 + n]
            if not _printable(raw):
                return False
            old = self._sections.get(sid)
            if old is not None and old.idstr != raw.decode("ascii"):
                return False
            return sid != self._section_id
        if t == SectionType.PART or t == SectionType.END:
            if end - j < 5:
                return None
            return _be32(buf, j + 1)[0] in self._sections
        if t == SectionType.EOF:
            if end - j < 2:
                return None
            if buf[j + 1] != SectionType.VMDESCRIPTION:
                return False
            if end - j < 7:
                return None
            (n,) = _be32(buf, j + 2)
            return 0 < n <= _MAX_VMDESC and buf[j + 6] == 0x7B  # "{"
        if t == SectionType.COMMAND:
            if end - j < 3:
                return None
            return _be16(buf, j + 1)[0] in MigCommand._value2member_map_
        return False

    def _h_command(self, buf: bytes, pos: int, end: int) -> int | None:
        take = min(self._command_left, end - pos)
        self._command_left -= take
        if self._command_left == 0:
            self._goto(_M.TOP)
        return pos + take

    def _h_after_eof(self, buf: bytes, pos: int, end: int) -> int | None:
        if buf[pos] != SectionType.VMDESCRIPTION:
            raise self._err(
                f"expected the VM description (0x06) after QEMU_VM_EOF, got {buf[pos]:#04x}",
                pos,
            )
        self._vmdesc_at = self._base + pos
        self._goto(_M.VMDESC_LEN)
        return pos + 1

    def _h_vmdesc_len(self, buf: bytes, pos: int, end: int) -> int | None:
        if end - pos < 4:
            return None
        (n,) = _be32(buf, pos)
        if n == 0 or n > _MAX_VMDESC:
            raise self._err(f"VM description length {n} is implausible", pos)
        self.vmdesc_size = n
        self._vmdesc_left = n
        self._goto(_M.VMDESC)
        return pos + 4

    def _h_vmdesc(self, buf: bytes, pos: int, end: int) -> int | None:
        take = min(self._vmdesc_left, end - pos)
        self._vmdesc_buf += buf[pos : pos + take]
        self._vmdesc_left -= take
        if self._vmdesc_left:
            return pos + take
        raw = bytes(self._vmdesc_buf)
        self._vmdesc_buf = bytearray()
        self._check_vmdesc(raw)
        self._goto(_M.DONE)
        return pos + take

    def _check_vmdesc(self, raw: bytes) -> None:
        at = self._vmdesc_at
        try:
            desc = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise WireError(f"VM description is not valid JSON: {e}", at) from None
        if not isinstance(desc, dict):
            raise WireError("VM description is not a JSON object", at)
        devices = desc.get("devices")
        if not isinstance(desc.get("page_size"), int) or not isinstance(devices, list):
            raise WireError("VM description lacks page_size or devices", at)
        listed: list[tuple[object, object]] = []
        for d in devices:
            if not isinstance(d, dict):
                raise WireError("VM description: a device entry is not an object", at)
            listed.append((d.get("name"), d.get("instance_id")))
        seen = [
            (d.idstr, d.instance_id) for d in self.devices if d.section_type is SectionType.FULL
        ]
        if listed != seen:
            diff = next(
                (k for k, (a, b) in enumerate(zip(listed, seen, strict=False)) if a != b),
                min(len(listed), len(seen)),
            )
            raise WireError(
                f"VM description lists {len(listed)} devices, the stream has {len(seen)} "
                f"device sections; first difference at #{diff}: "
                f"{listed[diff] if diff < len(listed) else None} vs "
                f"{seen[diff] if diff < len(seen) else None}",
                at,
            )
        # 7.2 measures each field's "size" as the bytes it wrote, so the
        # description predicts every device section's length exactly: this
        # proves the footer scan delimited each section where QEMU did.
        full = [d for d in self.devices if d.section_type is SectionType.FULL]
        for dev, entry in zip(full, devices, strict=True):
            predicted = _vmdesc_size(entry)
            if predicted is not None and predicted != dev.size:
                raise WireError(
                    f"device section {dev.section_id} '{dev.idstr}' holds {dev.size} bytes, "
                    f"the VM description accounts for {predicted}",
                    dev.offset,
                )
        self.vmdesc = desc

    def _h_done(self, buf: bytes, pos: int, end: int) -> int | None:
        raise self._err("data after the end of the migration stream", pos)


def _vmdesc_size(entry: dict[str, Any], depth: int = 0) -> int | None:
    """Bytes a device (or subsection) described by *entry* wrote; None if not computable.

    Fields give ``size`` per element and ``array_len``; each subsection adds
    its own header: 0x05, u8 name length, name, be32 version.
    """
    if depth > 32:
        return None
    total = 0
    fields = entry.get("fields", [])
    subsections = entry.get("subsections", [])
    if not isinstance(fields, list) or not isinstance(subsections, list):
        return None
    for f in fields:
        size = f.get("size") if isinstance(f, dict) else None
        count = f.get("array_len", 1) if isinstance(f, dict) else None
        if not isinstance(size, int) or not isinstance(count, int):
            return None
        total += size * count
    for sub in subsections:
        name = sub.get("vmsd_name") if isinstance(sub, dict) else None
        if not isinstance(name, str):
            return None
        inner = _vmdesc_size(sub, depth + 1)
        if inner is None:
            return None
        total += 1 + 1 + len(name.encode()) + 4 + inner
    return total


# -- multifd channel -----------------------------------------------------------------------


class _F(enum.Enum):
    INIT = "the 64-byte multifd init packet"
    HEADER = "a multifd packet header"


class MultifdStreamWalker(_Walker):
    """Walks one multifd channel: the init packet, then packets, in bounded memory.

    Packets are a header of ``320 + 8 * pages_alloc`` bytes (1344 in 7.2)
    followed by ``normal_pages`` pages (or, with zlib/zstd compression,
    ``next_packet_size`` bytes when there are pages).  Flags bit 0 is SYNC.

    :attr:`ok` — no malformed data and the stream (after EOF) ended on a
    packet boundary.  A channel cut exactly between packets looks well-formed:
    only the SYNC count proves completeness, see :meth:`is_complete` and
    :func:`check_multifd`.  *ram_blocks* (name → size), when given, lets the
    walker check block names and page offsets like the destination does.
    """

    def __init__(
        self,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        ram_blocks: dict[str, int] | Iterable[RamBlock] | None = None,
    ) -> None:
        super().__init__()
        self.page_size = page_size
        if ram_blocks is None:
            self._blocks: dict[str, int] | None = None
        elif isinstance(ram_blocks, dict):
            self._blocks = dict(ram_blocks)
        else:
            self._blocks = {b.name: b.size for b in ram_blocks}
        self.init: MultifdInit | None = None
        self.packets = 0
        self.normal_pages = 0
        self.sync_packets = 0
        self.pages_alloc: int | None = None
        self.last_packet_num: int | None = None
        self.compression = 0
        self._state = _F.INIT
        self._handler = self._h_init

    @property
    def channel_id(self) -> int | None:
        return None if self.init is None else self.init.channel_id

    @property
    def ok(self) -> bool:
        """Well-formed and, once EOF was fed, ended between two packets."""
        return self.error is None and (not self._eof or self._is_complete())

    @property
    def reason(self) -> str | None:
        """Why the channel is not (yet) well-formed and ended, or ``None``."""
        if self.error is None and not self._eof:
            return f"stream still open after {self._fed} bytes: expected {self.expected}"
        return super().reason

    def is_complete(self, ram_sections: int) -> bool:
        """Ended cleanly with one SYNC packet per ``ram`` section of the main stream."""
        return self.ok and self._eof and self.sync_packets == ram_sections

    def _is_complete(self) -> bool:
        return self.init is not None and not self._pending and self._pos == self._fed

    def _expected(self) -> str:
        if self._pos > self._fed:
            return f"{self._pos - self._fed} more bytes of page data of packet #{self.packets}"
        if self._state is _F.HEADER:
            return (
                f"{_F.HEADER.value} (or EOF)"
                if not self._pending
                else f"the rest of the header of packet #{self.packets + 1}"
            )
        return self._state.value

    def summary(self) -> dict[str, Any]:
        return {
            "kind": "multifd",
            "ok": self.ok,
            "reason": None if self.ok else self.reason,
            "bytes": self._fed,
            "channel_id": self.channel_id,
            "uuid": None if self.init is None else str(self.init.uuid),
            "packets": self.packets,
            "normal_pages": self.normal_pages,
            "sync_packets": self.sync_packets,
        }

    def _h_init(self, buf: bytes, pos: int, end: int) -> int | None:
        if end - pos < MULTIFD_INIT_SIZE:
            return None
        try:
            self.init = MultifdInit.parse(buf[pos : pos + MULTIFD_INIT_SIZE])
        except WireError as e:
            raise self._err(e.message, pos + (e.offset or 0)) from None
        self._state = _F.HEADER
        self._handler = self._h_packet
        return pos + MULTIFD_INIT_SIZE

    def _h_packet(self, buf: bytes, pos: int, end: int) -> int | None:
        if end - pos < 24:
            return None
        magic, version, flags, pages_alloc, normal, next_size = _be32x6(buf, pos)
        if magic != MULTIFD_MAGIC:
            raise self._err(
                f"multifd: received packet magic {magic:x} and expected magic {MULTIFD_MAGIC:x}",
                pos,
            )
        if version != MULTIFD_VERSION:
            raise self._err(
                f"multifd: received packet version {version} and expected version "
                f"{MULTIFD_VERSION}",
                pos + 4,
            )
        if flags & ~(MULTIFD_FLAG_SYNC | MULTIFD_FLAG_COMPRESSION_MASK):
            raise self._err(f"multifd: unknown packet flags {flags:#x}", pos + 8)
        comp = flags & MULTIFD_FLAG_COMPRESSION_MASK
        if comp not in (0, MULTIFD_FLAG_ZLIB, MULTIFD_FLAG_ZSTD):
            raise self._err(f"multifd: unknown compression method in flags {flags:#x}", pos + 8)
        if not 0 < pages_alloc <= _MULTIFD_MAX_PAGES_ALLOC:
            raise self._err(
                f"multifd: received packet with size {pages_alloc} and expected a size of "
                f"at most {_MULTIFD_MAX_PAGES_ALLOC}",
                pos + 12,
            )
        if self.pages_alloc is None:
            self.pages_alloc = pages_alloc
        elif pages_alloc != self.pages_alloc:
            raise self._err(
                f"multifd: packet pages_alloc changed from {self.pages_alloc} to {pages_alloc}",
                pos + 12,
            )
        if normal > pages_alloc:
            raise self._err(
                f"multifd: received packet with {normal} pages and expected maximum pages "
                f"are {pages_alloc}",
                pos + 16,
            )
        hdr = MULTIFD_PACKET_FIXED_SIZE + 8 * pages_alloc
        if end - pos < hdr:
            return None
        (packet_num,) = _be64(buf, pos + 24)
        # Never decreasing, but not strictly increasing: 7.2 may follow a SYNC
        # packet that carries pages with an empty packet of the same number.
        if self.last_packet_num is not None and packet_num < self.last_packet_num:
            raise self._err(
                f"multifd: packet_num {packet_num} after {self.last_packet_num}", pos + 24
            )
        if normal:
            raw = buf[pos + 64 : pos + 64 + 256]
            nul = raw.find(b"\0")
            name_raw = raw if nul < 0 else raw[:nul]
            if not _printable(name_raw):
                raise self._err(f"multifd: invalid ram block name {name_raw!r}", pos + 64)
            name = name_raw.decode("ascii")
            offsets = struct.unpack_from(f">{normal}Q", buf, pos + MULTIFD_PACKET_FIXED_SIZE)
            mask = self.page_size - 1
            limit: int | None = None
            if self._blocks is not None:
                if name not in self._blocks:
                    raise self._err(f"multifd: unknown ram block {name}", pos + 64)
                limit = self._blocks[name] - self.page_size
            for k, off in enumerate(offsets):
                if off & mask or (limit is not None and off > limit):
                    raise self._err(
                        f"multifd: invalid page offset {off:#x} in block {name}",
                        pos + MULTIFD_PACKET_FIXED_SIZE + 8 * k,
                    )
            payload = normal * self.page_size if comp == 0 else next_size
        else:
            payload = 0
        self.compression = comp
        self.last_packet_num = packet_num
        self.packets += 1
        self.normal_pages += normal
        if flags & MULTIFD_FLAG_SYNC:
            self.sync_packets += 1
        self._item = self._base + pos
        return pos + hdr + payload


def check_multifd(
    main: MainStreamWalker, channels: Sequence[MultifdStreamWalker], *, expected: int | None = None
) -> None:
    """Raise :class:`WireError` unless main plus *channels* form a complete multifd recording.

    Checks: main complete; every channel well-formed, ended, with a distinct
    id and the same uuid; ``expected`` channels if given; and every channel
    has exactly as many SYNC packets as main has ``ram`` sections (the only
    proof that a channel cut between packets is not complete).
    """
    if not main.complete:
        raise WireError(f"main channel: {main.reason}")
    if expected is not None and len(channels) != expected:
        raise WireError(f"{len(channels)} multifd channels, expected {expected}")
    ids: set[int] = set()
    uuids: set[uuidlib.UUID] = set()
    for k, ch in enumerate(channels):
        if ch.init is None or not ch.ok or not ch.eof:
            raise WireError(f"multifd channel #{k}: {ch.reason or 'not ended'}")
        if ch.init.channel_id in ids:
            raise WireError(f"multifd channel id {ch.init.channel_id} appears twice")
        ids.add(ch.init.channel_id)
        uuids.add(ch.init.uuid)
        if ch.sync_packets != main.ram_sections:
            raise WireError(
                f"multifd channel {ch.init.channel_id}: {ch.sync_packets} SYNC packets, "
                f"the main stream has {main.ram_sections} ram sections",
                ch.bytes_fed,
            )
    if len(uuids) > 1:
        raise WireError(f"multifd channels carry different uuids: {sorted(map(str, uuids))}")
    if channels and ids != set(range(len(channels))):
        raise WireError(f"multifd channel ids {sorted(ids)} are not 0..{len(channels) - 1}")
