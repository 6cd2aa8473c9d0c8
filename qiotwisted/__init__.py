"""qiotwisted: QEMU's I/O layer on Twisted, and QEMU live-migration endpoints."""

from .channel import (
    BufferChannel,
    Channel,
    Condition,
    Feature,
    Shutdown,
    SocketChannel,
    TLSChannel,
    port_of,
)
from .coroutine import (
    CoMutex,
    CoQueue,
    Coroutine,
    CoroutineError,
    CoRwLock,
    CoSleep,
    co_sleep,
    coroutine_entered,
    coroutine_self,
    coroutine_yield,
    in_coroutine,
)
from .dns import Resolver
from .errors import ChannelEOFError, ChannelError, QIOError, TaskCancelledError
from .listener import ListenError, NetListener, NetListenerService
from .task import Task, run_in_worker

__all__ = [
    "BufferChannel",
    "Channel",
    "ChannelEOFError",
    "ChannelError",
    "CoMutex",
    "CoQueue",
    "CoRwLock",
    "CoSleep",
    "Condition",
    "Coroutine",
    "CoroutineError",
    "Feature",
    "ListenError",
    "NetListener",
    "NetListenerService",
    "QIOError",
    "Resolver",
    "Shutdown",
    "SocketChannel",
    "TLSChannel",
    "Task",
    "TaskCancelledError",
    "co_sleep",
    "coroutine_entered",
    "coroutine_self",
    "coroutine_yield",
    "in_coroutine",
    "port_of",
    "run_in_worker",
]
