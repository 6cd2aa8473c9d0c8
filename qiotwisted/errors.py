"""The exceptions qiotwisted raises.  Messages follow QEMU's wording where QEMU has one."""

from __future__ import annotations

__all__ = [
    "ChannelClosedError",
    "ChannelEOFError",
    "ChannelError",
    "QIOError",
    "TaskCancelledError",
]


class QIOError(Exception):
    """Base class of every error qiotwisted raises on purpose (QEMU's ``Error``)."""


class ChannelError(QIOError):
    """An I/O operation on a channel failed; the message says why, as QEMU would."""


class ChannelEOFError(ChannelError):
    """The peer closed the stream before the requested bytes arrived."""

    def __init__(self, message: str = "Unexpected end-of-file before all data were read") -> None:
        super().__init__(message)


class ChannelClosedError(ChannelError):
    """The channel was closed locally; no further I/O is possible."""

    def __init__(self, message: str = "Channel is closed") -> None:
        super().__init__(message)


class TaskCancelledError(QIOError):
    """A Task was cancelled before its worker's result could be delivered."""

    def __init__(self, message: str = "Task was cancelled") -> None:
        super().__init__(message)
