"""The real-QEMU harness and the wire walkers against real QEMU 7.2 streams.

These tests fail (they are not skipped) when qemu-system-x86_64 is missing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from qiotwisted.migration.wire import (
    MULTIFD_FLAG_SYNC,
    ChannelKind,
    MainStreamWalker,
    MultifdInit,
    MultifdStreamWalker,
    WireError,
    check_multifd,
    classify,
)
from tests.qemu import (
    check_ram,
    qemu_binary,
    qemu_destination,
    qemu_source,
    stdlib_send,
    stdlib_sink,
)

pytestmark = pytest.mark.qemu

RAM_MIB = 64


def walk_main(path: Path, chunk: int = 1 << 16, limit: int | None = None) -> MainStreamWalker:
    w = MainStreamWalker()
    with open(path, "rb") as f:
        left = limit if limit is not None else -1
        while left != 0:
            data = f.read(chunk if left < 0 else min(chunk, left))
            if not data:
                break
            w.feed(data)
            if left > 0:
                left -= len(data)
    w.feed(b"")
    return w


def walk_multifd(
    path: Path, main: MainStreamWalker, limit: int | None = None
) -> MultifdStreamWalker:
    w = MultifdStreamWalker(ram_blocks=main.ram_blocks)
    data = path.read_bytes()
    if limit is not None:
        data = data[:limit]
    for k in range(0, len(data), 1 << 16):
        w.feed(data[k : k + (1 << 16)])
    w.feed(b"")
    return w


def test_qemu_binary_missing_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RuntimeError, match="not installed"):
        qemu_binary()


def test_plain_capture_walk_replay(tmp_path: Path) -> None:
    with qemu_source(tmp_path / "src", ram_mib=RAM_MIB, seed=7) as src:
        assert src.ram_path is not None
        with stdlib_sink(tmp_path / "cap") as sink:
            src.set_capabilities()
            src.set_parameters()
            src.migrate(f"tcp:127.0.0.1:{sink.port}")
            status = src.wait_migration(timeout=60)
            assert status["status"] == "completed", status
            sink.wait_connections_closed(1, timeout=30)
        assert len(sink.files) == 1 and not sink.errors
        main = sink.files[0]
        assert main.stat().st_size == sink.sizes[0] > RAM_MIB << 20

        head = main.read_bytes()[:4]
        assert classify(head) is ChannelKind.MAIN

        w = walk_main(main)
        assert w.complete, w.reason
        assert w.problem is None
        assert w.machine_type == "pc-i440fx-7.2"
        assert w.version == 3
        assert w.ram_section_id is not None
        blocks = {b.name: b.size for b in w.ram_blocks}
        assert blocks["pc.ram"] == RAM_MIB << 20
        assert w.ram_total == sum(blocks.values())
        # Random RAM: every pc.ram page goes as a normal page at least once.
        assert w.normal_pages >= (RAM_MIB << 20) // 4096
        assert w.ram_sections >= 3  # START, at least one PART, END
        assert w.section_footers is True
        assert w.vmdesc is not None and w.vmdesc["page_size"] == 4096
        names = [d["name"] for d in w.vmdesc["devices"]]
        assert "cpu" in names and "globalstate" in names
        assert [d.idstr for d in w.devices] == names
        assert all(d.size >= 0 for d in w.devices)

        # Different chunkings give the same verdict and counts.
        w2 = walk_main(main, chunk=4093)
        assert w2.complete and w2.normal_pages == w.normal_pages
        assert w2.zero_pages == w.zero_pages and w2.ram_sections == w.ram_sections

        # A truncated copy is not complete, and says where it broke.
        size = main.stat().st_size
        for cut in (size - 1, size - (w.vmdesc_size or 0) - 3, size // 2, 100):
            t = walk_main(main, limit=cut)
            assert not t.complete
            assert t.problem is not None
            assert t.problem.offset is not None and 0 <= t.problem.offset <= cut
            assert f"stream ends at byte {cut}" in str(t.problem)

        # Replay the capture into a real destination with a plain stdlib sender.
        with qemu_destination(tmp_path / "dst", ram_mib=RAM_MIB) as dst:
            dst.set_capabilities()
            dst.set_parameters()
            port = dst.migrate_incoming("tcp:127.0.0.1:0")
            assert port > 0
            stdlib_send(port, main, timeout=60)
            result = dst.wait_migration(timeout=60)
            assert result["status"] == "completed", result
            assert dst.query_status()["status"] in ("prelaunch", "paused")
            check_ram(dst, src.ram_path)


def test_multifd_capture_walk_replay(tmp_path: Path) -> None:
    with qemu_source(tmp_path / "src", ram_mib=RAM_MIB, seed=8) as src:
        assert src.ram_path is not None
        with stdlib_sink(tmp_path / "cap") as sink:
            src.set_capabilities(multifd=True)
            src.set_parameters(multifd_channels=2)
            src.migrate(f"tcp:127.0.0.1:{sink.port}")
            status = src.wait_migration(timeout=60)
            assert status["status"] == "completed", status
            sink.wait_connections_closed(3, timeout=30)
        assert len(sink.files) == 3 and not sink.errors
        main_path, *chan_paths = sink.files

        assert classify(main_path.read_bytes()[:4]) is ChannelKind.MAIN
        main = walk_main(main_path)
        assert main.complete, main.reason
        # With multifd the pages travel on the other channels.
        assert main.normal_pages < 100
        assert main.bytes_fed < 1 << 20

        chans = [walk_multifd(p, main) for p in chan_paths]
        for p, ch in zip(chan_paths, chans, strict=True):
            assert classify(p.read_bytes()[:4]) is ChannelKind.MULTIFD
            assert ch.ok, ch.reason
            assert ch.init is not None and str(ch.init.uuid) == src.uuid
            assert ch.sync_packets == main.ram_sections
            assert ch.pages_alloc == 128
        assert sorted(ch.channel_id for ch in chans if ch.channel_id is not None) == [0, 1]
        assert sum(ch.normal_pages for ch in chans) >= (RAM_MIB << 20) // 4096
        check_multifd(main, chans, expected=2)

        # A channel cut exactly before its last SYNC packet is well-formed; only the SYNC
        # count catches it.  (Cutting before the very last packet is not enough: a 7.2
        # source may follow its final SYNC with an empty non-SYNC packet, which is no loss.)
        ch0 = chans[0]
        boundary = _last_sync_packet_start(chan_paths[0])
        cut = walk_multifd(chan_paths[0], main, limit=boundary)
        assert cut.ok
        assert cut.sync_packets < ch0.sync_packets or cut.packets < ch0.packets
        with pytest.raises(WireError):
            check_multifd(main, [cut, chans[1]], expected=2)
        # Cut inside a packet: not ok.
        inside = walk_multifd(chan_paths[0], main, limit=boundary + 1000)
        assert not inside.ok and inside.problem is not None

        # Replay into a multifd destination with the source's uuid.
        with qemu_destination(tmp_path / "dst", ram_mib=RAM_MIB, uuid=src.uuid) as dst:
            dst.set_capabilities(multifd=True)
            dst.set_parameters(multifd_channels=2)
            port = dst.migrate_incoming("tcp:127.0.0.1:0")
            stdlib_send(port, main_path, chan_paths, timeout=60)
            result = dst.wait_migration(timeout=60)
            assert result["status"] == "completed", result
            check_ram(dst, src.ram_path)


def _last_sync_packet_start(path: Path) -> int:
    """Offset of the start of the last SYNC packet of a multifd channel file."""
    import struct

    data = path.read_bytes()
    pos, last = 64, None
    while pos < len(data):
        flags, alloc, normal = struct.unpack_from(">III", data, pos + 8)
        if flags & MULTIFD_FLAG_SYNC:
            last = pos
        pos += 320 + 8 * alloc + normal * 4096
    assert last is not None, f"{path} holds no SYNC packet"
    return last


def test_hung_multifd_destination_is_killed(tmp_path: Path) -> None:
    """A multifd destination fed a wrong uuid hangs; stop() ends it by PID in bounded time."""
    dst_cm = qemu_destination(tmp_path / "dst", ram_mib=RAM_MIB)
    with dst_cm as dst:
        dst.set_capabilities(multifd=True)
        dst.set_parameters(multifd_channels=1)
        port = dst.migrate_incoming("tcp:127.0.0.1:0")
        header = b"QEVM\x00\x00\x00\x03"
        main_file = tmp_path / "main.bin"
        main_file.write_bytes(header)
        chan = tmp_path / "mf.bin"
        chan.write_bytes(MultifdInit.build(uuid=bytes(16), channel_id=0))
        stdlib_send(port, main_file, [chan], timeout=10)
        time.sleep(0.2)  # let QEMU read the bad init packet; it then hangs (checked next)
        pid = dst.proc.pid
        assert dst.proc.poll() is None  # hung, not exited
        t0 = time.monotonic()
        dst.stop(grace=1.0)
        assert time.monotonic() - t0 < 15
    assert dst.proc.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "uuid" in dst.log()
