"""The process-wide engine: one io thread (an asyncio loop) and the native media threads.

What it owns: the io loop every voice gateway websocket, IP discovery and event callback runs on; the
:class:`telecom._fast.engine.MediaEngine` whose threads send audio for every connection of the
process; and the routing of native events (Speaking wanted, silence tail done, a playable ended) from
the media threads to the objects they concern.

It must not do per-packet work in Python: the media threads never call back into Python, they raise
events through an eventfd the io loop watches. (The one exception is a connection's frame encryptor,
the DAVE hook, which the media thread calls with the GIL taken once per batch of frames.)

The engine starts lazily, on the first :class:`~telecom.Client`; :func:`configure` may set the number
of media threads before that (default: one per CPU core available to the process).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import weakref
from concurrent.futures import Future
from typing import Any, Callable, Coroutine

from telecom._fast import load as _load
from telecom.errors import ConfigurationError

log = logging.getLogger("telecom.engine")

_native = _load("engine")

EV_SPEAKING_START = "speaking_start"
EV_SPEAKING_STOP = "speaking_stop"
EV_SOURCE_ENDED = "source_ended"
EV_SEND_ERROR = "send_error"
EV_ENCODE_ERROR = "encode_error"
EV_FRAME_ENCRYPTOR_ERROR = "frame_encryptor_error"


class Engine:
    """The io loop thread plus the native media engine. Use :func:`get_engine`."""

    def __init__(self, media_threads: int | None = None, realtime_priority: int = 0,
                 work_ahead: bool = True, rebalance: bool = True) -> None:
        if media_threads is None:
            media_threads = _default_media_threads()
        self.media = _native.MediaEngine(media_threads, realtime_priority, work_ahead, rebalance)
        self._ids = itertools.count(1)
        # conn_id -> object with handle_engine_event(kind, value); weak so a dropped Client is collected
        self._listeners: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._loop_exception)
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, name="telecom-io", daemon=True)
        self.loop_errors: list[dict] = []
        self._thread.start()
        self._started.wait()
        self.media.start()

    # -- io loop ------------------------------------------------------------------------------------
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.add_reader(self.media.event_fd, self._drain_events)
        self._loop.call_soon(self._started.set)
        self._loop.run_forever()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        # Kept for tests (they fail when anything lands here) and logged; never silent.
        self.loop_errors.append(context)
        log.error("unhandled error on telecom's io loop: %s", context.get("message"),
                  exc_info=context.get("exception"))

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine) -> Future:
        """Run a coroutine on the io loop from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def call_soon(self, fn: Callable, *args: Any) -> None:
        """Run ``fn(*args)`` on the io loop (at once when already there)."""
        if self.in_loop():
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    # -- native objects ----------------------------------------------------------------------------
    def new_id(self) -> int:
        return next(self._ids)

    def new_connection(self, listener: Any, *, bitrate: int, complexity: int, fec: bool,
                       expected_loss: int):
        conn_id = self.new_id()
        conn = _native.NativeConnection(self.media, conn_id, bitrate, complexity, fec, expected_loss)
        self._listeners[conn_id] = listener
        return conn

    def new_source(self, capacity_bytes: int):
        """A native PCM ring of ``capacity_bytes`` that connections can play from."""
        return _native.PcmSource(self.new_id(), capacity_bytes)

    def new_opus_source(self, max_packets: int):
        """A native queue of up to ``max_packets`` 20 ms Opus packets, sent as they are when possible."""
        # bytes for max_packets of the largest size (1275 + a 2-byte length): the packet count is the limit
        return _native.OpusSource(self.new_id(), max(3840, max_packets * 1277), max_packets)

    def register_source(self, source_id: int, listener: Any) -> None:
        self._listeners[source_id] = listener

    def _drain_events(self) -> None:
        for kind, target_id, value in self.media.poll_events():
            name = _native.EV_KINDS.get(kind, str(kind))
            key = value if name == EV_SOURCE_ENDED else target_id
            listener = self._listeners.get(key)
            if listener is None:
                continue
            try:
                listener.handle_engine_event(name, target_id, value)
            except Exception:  # noqa: BLE001 - a listener bug must not kill the io loop
                log.exception("engine event handler failed (%s)", name)

    def stats(self) -> dict:
        return self.media.stats()


def _default_media_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


_engine: Engine | None = None
_engine_lock = threading.Lock()
_media_threads: int | None = None
_realtime_priority = 0
_work_ahead = True
_rebalance = True


def configure(*, media_threads: int | None = None, realtime_priority: int | None = None,
              work_ahead: bool | None = None, rebalance: bool | None = None) -> None:
    """Set engine options before the first client starts it (ConfigurationError afterwards).

    ``realtime_priority`` (1..99, default 0 = off) runs the media threads as SCHED_FIFO, so that other
    processes on a busy host cannot delay a tick; it needs CAP_SYS_NICE (or RLIMIT_RTPRIO) and falls
    back to normal scheduling with a warning when refused.

    ``work_ahead`` (default on) lets a media thread prepare a connection's next frame (mix, encode or
    take the Opus packet, DAVE, seal) as soon as its sources hold it, in the time left before the next
    send; the sealed frame waits for its deadline. A host stall then delays only sends, not a backlog
    of encodes. Off, every frame is prepared at its deadline, and pause, volume and seek reach the wire
    one frame (20 ms) sooner.

    ``rebalance`` (default on; matters with several media threads) lets a media thread that carries
    clearly more load than another (0.5 ms per 20 ms tick and a quarter more) hand it running connections
    worth half the difference, at most once a second, between two ticks: a connection keeps its send
    time, and no frame is lost, repeated or reordered. Off, a connection stays on the thread it was
    placed on when it was created (the least loaded one then).
    """
    global _media_threads, _realtime_priority, _work_ahead, _rebalance
    with _engine_lock:
        if _engine is not None:
            raise ConfigurationError("the engine is already running; configure it before the first Client")
        if media_threads is not None and media_threads < 1:
            raise ConfigurationError("media_threads must be >= 1")
        if realtime_priority is not None and not 0 <= realtime_priority <= 99:
            raise ConfigurationError("realtime_priority must be 0 (off) or 1..99")
        _media_threads = media_threads
        if realtime_priority is not None:
            _realtime_priority = realtime_priority
        if work_ahead is not None:
            _work_ahead = bool(work_ahead)
        if rebalance is not None:
            _rebalance = bool(rebalance)


def settings() -> dict:
    """The engine's options: the running engine's, or (``running`` false) what it will start with."""
    with _engine_lock:
        if _engine is not None:
            media = _engine.media
            return {"running": True, "media_threads": media.threads,
                    "realtime_priority": media.realtime_priority, "work_ahead": bool(media.work_ahead),
                    "rebalance": bool(media.rebalance)}
        return {"running": False, "media_threads": _media_threads or _default_media_threads(),
                "realtime_priority": _realtime_priority, "work_ahead": _work_ahead, "rebalance": _rebalance}


def get_engine() -> Engine:
    """The process's engine, started on first use."""
    global _engine
    if _engine is None:
        with _engine_lock:
            if _engine is None:
                _engine = Engine(_media_threads, _realtime_priority, _work_ahead, _rebalance)
    return _engine
