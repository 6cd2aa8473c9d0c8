"""twistd dropin for ``twistd qio``; the service itself lives in :mod:`qiotwisted.tap`.

Keep this file tiny: twistd imports every dropin on ``--help``, and importing the
reactor here would break ``twistd --reactor=...`` for every plugin.
"""

from twisted.application.service import ServiceMaker

qio = ServiceMaker(
    "qiotwisted",
    "qiotwisted.tap",
    "Record, replay and proxy QEMU live migrations (plain, TLS, multifd).",
    "qio",
)
