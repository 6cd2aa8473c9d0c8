"""``qio inspect``: look inside a recording without loading it into QEMU.

Reads a session directory (``main.bin`` plus any ``multifd-<id>.bin``) or a
single stream file, walks it with the sans-IO walkers of
:mod:`qiotwisted.migration.wire`, and reports what QEMU was sending: stream
version, machine type, RAM blocks, page counts, device sections (cross-checked
with the device description QEMU appends), whether the recording is complete
and, if not, where it breaks.  This is a command-line tool with no reactor:
it reads files synchronously, in bounded memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import wire

__all__ = ["InspectError", "Report", "inspect_path", "render_text"]

CHUNK = 1 << 20


class InspectError(Exception):
    """The path cannot be inspected at all (missing, unreadable, not a recording)."""


@dataclass
class Report:
    path: str
    main: dict[str, Any]
    devices: list[dict[str, Any]]
    multifd: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = False
    problems: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "complete": self.complete,
            "problems": self.problems,
            "main": self.main,
            "devices": self.devices,
            "multifd": self.multifd,
        }


def _walk_file(path: Path, walker: wire.MainStreamWalker | wire.MultifdStreamWalker) -> str | None:
    """Feed *path* to *walker*; return the WireError text if the content is malformed."""
    try:
        with open(path, "rb") as f:
            while data := f.read(CHUNK):
                walker.feed(data)
            walker.feed(b"")
    except wire.WireError as e:
        return str(e)
    except OSError as e:
        raise InspectError(f"cannot read {path}: {e.strerror or e}") from e
    return None


def _problem(name: str, walker: wire.MainStreamWalker | wire.MultifdStreamWalker) -> str | None:
    reason = walker.reason
    return f"{name}: {reason}" if reason else None


def inspect_path(target: Path | str) -> Report:
    """Walk a session directory or a single main-stream (or multifd) file."""
    path = Path(target)
    if path.is_dir():
        main_path = path / "main.bin"
        if not main_path.is_file():
            raise InspectError(f"{path}: no main.bin (not a qio session directory)")
        multifd_paths = sorted(
            path.glob("multifd-*.bin"), key=lambda p: int(p.stem.split("-", 1)[1] or 0)
        )
    elif path.is_file():
        main_path, multifd_paths = path, []
        with open(path, "rb") as f:
            head = f.read(4)
        if len(head) == 4 and wire.classify(head) is wire.ChannelKind.MULTIFD:
            return _inspect_lone_multifd(path)
    else:
        raise InspectError(f"{path}: no such file or directory")

    main = wire.MainStreamWalker()
    _walk_file(main_path, main)
    problems = [p for p in [_problem(main_path.name, main)] if p]
    summary = main.summary()
    summary["file"] = main_path.name
    devices = [
        {
            "name": d.idstr,
            "instance_id": d.instance_id,
            "version_id": d.version_id,
            "section_id": d.section_id,
            "offset": d.offset,
            **({"size": d.size} if d.size >= 0 else {}),
        }
        for d in main.devices
    ]
    multifd: list[dict[str, Any]] = []
    for p in multifd_paths:
        w = wire.MultifdStreamWalker()
        _walk_file(p, w)
        s = w.summary()
        s["file"] = p.name
        multifd.append(s)
        if not w.ok:
            problems.append(f"{p.name}: {w.reason}")
        elif main.complete and not w.is_complete(main.ram_sections):
            problems.append(
                f"{p.name}: {w.sync_packets} SYNC packets, the main stream has "
                f"{main.ram_sections} ram sections"
            )
    report = Report(str(path), summary, devices, multifd)
    report.problems = problems
    report.complete = main.complete and not problems
    return report


def _inspect_lone_multifd(path: Path) -> Report:
    w = wire.MultifdStreamWalker()
    _walk_file(path, w)
    s = w.summary()
    s["file"] = path.name
    report = Report(str(path), {}, [], [s])
    report.problems = [] if w.ok else [f"{path.name}: {w.reason}"]
    # A lone multifd channel cannot be judged complete without its main stream.
    report.complete = False
    if w.ok:
        report.problems.append("a multifd channel alone: completeness needs its main stream")
    return report


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:g} {unit}"
        value /= 1024
    return f"{value:g} GiB"


def render_text(report: Report) -> str:
    lines = [f"recording:     {report.path}"]
    m = report.main
    if m:
        lines += [
            f"stream:        {m['file']}, {m['bytes']} bytes, version {m['version']}",
            f"machine type:  {m['machine_type']}",
            "ram blocks:    "
            + (
                ", ".join(f"{b['name']} ({_size(b['size'])})" for b in m["ram_blocks"])
                or "none seen"
            ),
            f"pages:         {m['normal_pages']} normal, {m['zero_pages']} zero on main"
            + (
                f", {sum(c['normal_pages'] for c in report.multifd)} on multifd"
                if report.multifd
                else ""
            ),
            f"ram sections:  {m['ram_sections']}",
            f"devices:       {len(report.devices)} sections",
        ]
        for d in report.devices:
            size = f", {d['size']} bytes" if "size" in d else ""
            lines.append(
                f"  {d['name']:<32} instance {d['instance_id']:<3} version {d['version_id']}{size}"
            )
    for c in report.multifd:
        lines.append(
            f"multifd:       {c['file']}: channel {c['channel_id']}, {c['packets']} packets, "
            f"{c['normal_pages']} pages, {c['sync_packets']} SYNC"
        )
    lines.append(f"complete:      {'yes' if report.complete else 'no'}")
    lines += [f"  problem: {p}" for p in report.problems]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="qio inspect", description="Look inside a migration recording."
    )
    parser.add_argument("path", help="a session directory or a stream file")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    try:
        report = inspect_path(args.path)
    except (InspectError, wire.WireError) as e:
        print(f"qio inspect: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print(render_text(report))
    return 0 if report.complete else 1
