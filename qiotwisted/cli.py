"""The ``qio`` command: tools around recordings and TLS credentials.

``qio pki DIR`` makes TLS credentials in QEMU's layout.  The long-running
services (record, proxy) are ``twistd qio ...``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


_COMMANDS = {
    "pki": "generate a CA, server and client credentials in QEMU's layout",
    "send": "replay a recorded session into a QEMU destination",
    "inspect": "look inside a recording without loading it into QEMU",
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qio",
        description="Tools for QEMU live-migration recordings (the services run as `twistd qio`).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    sub.add_parser(
        "pki", help="generate a CA, server and client credentials in QEMU's layout", add_help=False
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    if not args or args[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "pki":
        from .crypto.pki import main as pki_main

        return pki_main(rest)
    if command == "send":
        from .migration.replay import main as send_main

        return send_main(rest)
    if command == "inspect":
        from .migration.inspect import main as inspect_main

        return inspect_main(rest)
    parser.parse_args(args)  # reports the unknown command and exits 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
