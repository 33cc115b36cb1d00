"""The Python side of receiving: the process's receive core, its output worker, and the routing of
what the core produces to outputs, muxers and clients.

What it owns: one :class:`telecom._fast.receive.ReceiveCore` per process (its native thread reads every
connection's socket, decrypts, jitter-buffers and decodes without the GIL) and one Python thread,
``telecom-output``, that drains the core's bounded batch queue — one GIL acquisition per 20 ms batch —
and hands each frame to the :class:`~telecom.output.Output` registered for its (connection, user),
each mixed muxer block to its :class:`~telecom.output.Muxer`, and speaking start/stop to the client.

What it must not do: run anything on the io loop per frame, or let an output's failure stop the
worker (it becomes an ``error`` event on the client and the output is closed).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from telecom._fast import load as _load
from telecom.errors import ConfigurationError, TelecomError

if TYPE_CHECKING:  # pragma: no cover
    from telecom.output import Muxer, Output

log = logging.getLogger("telecom.receive")

_native = _load("receive")

#: Frames buffered per talk spurt before it starts playing (60 ms); adaptive up to 200 ms.
DEFAULT_JITTER_DEPTH = 3
_jitter_depth = DEFAULT_JITTER_DEPTH


def configure(*, jitter_depth: int | None = None) -> None:
    """Receive options for connections that start receiving from now on: ``jitter_depth`` is the
    initial jitter-buffer depth in 20 ms frames (1..10; it adapts upwards on late packets)."""
    global _jitter_depth
    if jitter_depth is not None:
        if not isinstance(jitter_depth, int) or not 1 <= jitter_depth <= 10:
            raise ConfigurationError(f"jitter_depth must be 1..10 frames, not {jitter_depth!r}")
        _jitter_depth = jitter_depth


class Receiver:
    """The process-wide receive core plus the output worker. Use :func:`get_receiver`."""

    def __init__(self) -> None:
        self.core = _native.ReceiveCore()
        self._lock = threading.Lock()
        self._clients: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
        self._outputs: dict[tuple[int, int], Output] = {}
        self._muxers: dict[int, Muxer] = {}
        self._mux_ids = itertools.count(1)
        # monotonic ns (the core's arrival clock) -> Unix time, fixed once so frames stay consistent
        self.clock_offset = time.time() - _native.now_ns() / 1e9
        self.worker_errors = 0
        self._stopping = False
        self.core.start()
        self._worker = threading.Thread(target=self._work, name="telecom-output", daemon=True)
        self._worker.start()

    # -- connections ------------------------------------------------------------------------------
    def add_connection(self, client: Any, conn_id: int, fd: int, mode: str, key: bytes) -> None:
        self.core.remove_connection(conn_id)
        self.core.add_connection(conn_id, fd, mode, bytes(key), _jitter_depth)
        with self._lock:
            self._clients[conn_id] = client
            users = [uid for (cid, uid) in self._outputs if cid == conn_id]
        for uid in users:
            self.core.set_deliver(conn_id, uid, True)

    def remove_connection(self, conn_id: int) -> dict | None:
        return self.core.remove_connection(conn_id)

    def set_user_output(self, conn_id: int, user_id: int, output: Output | None) -> None:
        with self._lock:
            if output is None:
                self._outputs.pop((conn_id, user_id), None)
            else:
                self._outputs[(conn_id, user_id)] = output
        try:
            self.core.set_deliver(conn_id, user_id, output is not None)
        except TelecomError:
            pass  # not receiving yet: applied by add_connection

    def drop_outputs(self, conn_id: int) -> list[Output]:
        with self._lock:
            keys = [k for k in self._outputs if k[0] == conn_id]
            return [self._outputs.pop(k) for k in keys]

    # -- muxers -----------------------------------------------------------------------------------
    def add_muxer(self, muxer: Muxer, delay_ns: int) -> int:
        mux_id = next(self._mux_ids)
        self.core.add_muxer(mux_id, delay_ns)
        with self._lock:
            self._muxers[mux_id] = muxer
        return mux_id

    def remove_muxer(self, mux_id: int) -> None:
        self.core.remove_muxer(mux_id)
        with self._lock:
            self._muxers.pop(mux_id, None)

    # -- the output worker ------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stopping:
            try:
                records = self.core.next_batch(0.5)
                if records:
                    self._dispatch(records)
                with self._lock:
                    tapped = [m for m in self._muxers.values() if m._taps]
                if tapped:
                    now = _native.now_ns()
                    for muxer in tapped:
                        muxer._poll_taps(now)
            except Exception:  # noqa: BLE001 - the worker must survive anything
                self.worker_errors += 1
                log.exception("receive output worker failed on a batch")

    def _dispatch(self, records: list[tuple]) -> None:
        from telecom.output import AudioFrame

        offset = self.clock_offset
        with self._lock:
            outputs = self._outputs
            muxers = dict(self._muxers)
            # items(), not dict(self._clients): that reads the keys first and then looks each one up,
            # and a client collected in between (a GC run on another thread) raised KeyError here,
            # losing the whole batch. items() skips the dead ones under an iteration guard.
            clients = dict(self._clients.items())
        failed: list[tuple[int, int, Output, BaseException]] = []
        for kind, flags, conn_id, user_id, ssrc, rtp_ts, time_ns, pcm in records:
            if kind == "frame":
                output = outputs.get((conn_id, user_id))
                if output is None:
                    continue
                try:
                    output._deliver(AudioFrame(user_id, time_ns / 1e9 + offset, pcm, 48000, 2, rtp_ts,
                                               bool(flags & _native.FLAG_CONCEALED), time_ns, ssrc))
                except Exception as exc:  # noqa: BLE001 - reported as an event below
                    failed.append((conn_id, user_id, output, exc))
            elif kind == "mux":
                muxer = muxers.get(user_id)
                if muxer is not None:
                    try:
                        muxer._deliver_block(time_ns, time_ns / 1e9 + offset, pcm)
                    except Exception as exc:  # noqa: BLE001
                        failed.append((0, 0, muxer, exc))
            elif kind in ("speaking_start", "speaking_stop"):
                client = clients.get(conn_id)
                if client is not None:
                    client._audio_activity(user_id, ssrc, kind == "speaking_start")
            elif kind == "error":
                client = clients.get(conn_id)
                if client is not None:
                    client._emit("error", error=TelecomError(str(pcm)))
        for conn_id, user_id, output, exc in failed:
            log.error("output %r failed: %r; closing it", output, exc)
            with self._lock:
                if self._outputs.get((conn_id, user_id)) is output:
                    del self._outputs[(conn_id, user_id)]
            try:
                output.close()
            except Exception:  # noqa: BLE001
                log.debug("closing a failed output failed", exc_info=True)
            client = clients.get(conn_id)
            if client is not None:
                client._emit("error", error=TelecomError(f"output {output!r} failed: {exc!r}"),
                             user_id=user_id or None)


_receiver: Receiver | None = None
_receiver_lock = threading.Lock()


def get_receiver() -> Receiver:
    """The process's receiver, started on first use."""
    global _receiver
    if _receiver is None:
        with _receiver_lock:
            if _receiver is None:
                _receiver = Receiver()
    return _receiver


def now_ns() -> int:
    """The arrival clock (CLOCK_MONOTONIC, ns) every ``time_ns`` of the receive path is on."""
    return _native.now_ns()
