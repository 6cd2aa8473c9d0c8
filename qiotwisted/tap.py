"""``twistd qio``: options and service construction (filled in by the recorder)."""

from __future__ import annotations

from twisted.application import service
from twisted.python import usage


class Options(usage.Options):
    synopsis = "[options] [record]"


def makeService(options: Options) -> service.IService:
    return service.MultiService()
