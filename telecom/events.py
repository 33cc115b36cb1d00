"""Events: what :class:`~telecom.Client` and :class:`~telecom.remote.RemoteClient` report.

Owns the :class:`Event` value and :class:`EventEmitter`, the ``on``/``off`` callbacks and the
``async for event in x.events()`` iterators over one emit path. Subclasses decide on which thread the
callbacks run (:meth:`EventEmitter._dispatch`); iterators always deliver on the caller's own loop,
through a bounded queue whose drops are counted in ``events_dropped``. Nothing here blocks.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

log = logging.getLogger("telecom.events")

EVENT_QUEUE_SIZE = 1024


@dataclass(frozen=True)
class Event:
    """Something that happened: ``name`` plus event-specific ``data`` (its keys are attributes too)."""

    name: str
    data: dict = field(default_factory=dict)

    def __getattr__(self, item: str) -> Any:
        try:
            return self.__dict__["data"][item]
        except KeyError:
            raise AttributeError(item) from None


class EventEmitter:
    """``on``/``off``/``events()`` over :meth:`_emit`; thread-safe."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[Callable]] = defaultdict(list)
        self._queues: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._event_lock = threading.Lock()
        self.events_dropped = 0

    def on(self, event: str, callback: Callable[[Event], Any]) -> Callable[[Event], Any]:
        """Call ``callback(event)`` for each event named ``event`` (``"*"``: all). Returns ``callback``."""
        with self._event_lock:
            self._handlers[event].append(callback)
        return callback

    def off(self, event: str, callback: Callable[[Event], Any]) -> None:
        with self._event_lock:
            if callback in self._handlers.get(event, []):
                self._handlers[event].remove(callback)

    async def events(self) -> AsyncIterator[Event]:
        """Every event, delivered on the caller's loop (bounded; drops are counted in ``events_dropped``).
        Ends after the ``closed`` event."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(EVENT_QUEUE_SIZE)
        entry = (loop, queue)
        with self._event_lock:
            self._queues.append(entry)
        try:
            while True:
                event = await queue.get()
                yield event
                if event.name == "closed":
                    return
        finally:
            with self._event_lock:
                if entry in self._queues:
                    self._queues.remove(entry)

    def _emit(self, name: str, **data: Any) -> None:
        event = Event(name, data)
        with self._event_lock:
            handlers = list(self._handlers.get(name, ())) + list(self._handlers.get("*", ()))
            queues = list(self._queues)
        for loop, queue in queues:
            try:
                loop.call_soon_threadsafe(self._enqueue, queue, event)
            except RuntimeError:  # that loop has closed: its iterator is gone
                pass
        if handlers:
            self._dispatch(handlers, event)

    def _enqueue(self, queue: asyncio.Queue, event: Event) -> None:
        try:
            queue.put_nowait(event)
        except asyncio.QueueFull:
            self.events_dropped += 1

    def _dispatch(self, handlers: list[Callable], event: Event) -> None:
        """Run the callbacks (here: at once, on the emitting thread; subclasses may move them)."""
        self._run_handlers(handlers, event)

    def _run_handlers(self, handlers: list[Callable], event: Event) -> None:
        for handler in handlers:
            try:
                result = handler(event)
                if asyncio.iscoroutine(result):
                    self._schedule_coroutine(result)
            except Exception:  # noqa: BLE001 - a user callback must not break the emitter
                log.exception("event handler for %r failed", event.name)

    def _schedule_coroutine(self, coro: Any) -> None:
        coro.close()  # no loop to run it on; subclasses with one override this
        log.warning("an async event handler was given, but events here are delivered synchronously")
