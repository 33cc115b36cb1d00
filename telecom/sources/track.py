"""Track: the playable behind ``Playable.from_url`` / ``Playable.from_file``.

What it owns: the track's Python-side state (loading, error, duration, seek requests, the position
bases), its native rings — the 48 kHz s16 stereo PCM ring it is created with, and, when the input turns
out to be passthrough-capable Opus, the Opus ring that replaces it — and the hand-over between its decode
worker (:mod:`telecom.sources.decode`) and the engine. Control calls (pause, seek, stop, volume) return at
once; the worker applies seeks between packets.

Why the ring can change: whether a file can pass through is known only after probing, which happens in
the worker, while ``client.play()`` needs a native source at once. The track is played on its (empty)
PCM ring; if the probe finds 20 ms Opus it attaches an Opus ring to the same connections and retires the
empty PCM ring, whose end event is then ignored.

What it must not do: block the caller, or do I/O outside the worker.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from telecom.engine import EV_SOURCE_ENDED, get_engine
from telecom.errors import BufferFull, ConfigurationError, SourceError, TelecomError
from telecom.playable import FRAME_BYTES, Playable
from telecom.sources.decode import BYTES_PER_SECOND, DecodeError, _Stop, get_pool

log = logging.getLogger("telecom.sources")


class Track(Playable):
    """A URL or file decoded in the background (see ``Playable.from_url`` / ``Playable.from_file``).

    ``state`` is ``"loading"`` until the first audio is buffered, then ``"playing"`` / ``"paused"``,
    and finally ``"ended"`` or ``"error"``; ``duration`` is ``None`` until probed and for live streams;
    ``position`` counts what the engine has actually sent, from the last seek target.
    """

    def __init__(self, name: str, opener: Any, *, ahead_seconds: float = 5.0, passthrough: bool = True,
                 seekable_hint: bool | None = None) -> None:
        if not 0.1 <= float(ahead_seconds) <= 600:
            raise ConfigurationError("ahead_seconds must be between 0.1 and 600")
        engine = get_engine()
        capacity = int(ahead_seconds * 48000) * 4
        capacity = max(FRAME_BYTES, capacity - capacity % 4)
        super().__init__(engine.new_source(capacity))
        self._id = self._source.id
        self.name = name
        self.ahead_seconds = float(ahead_seconds)
        self._opener = opener
        self._passthrough_wanted = passthrough
        self._cond = threading.Condition()
        self._seek_to: float | None = None
        self._stopping = False
        self._started = False
        self._loading = True
        self._retired: set[int] = set()
        self._duration: float | None = None
        self._seekable: bool | None = seekable_hint
        self._pos_base = 0.0
        self._frames_base = 0
        self._decoded_bytes = 0          # written to the ring since the last seek
        self._pending = bytearray()      # decoded PCM short of a whole 20 ms frame
        self._flush_to: float | None = None  # a seek whose new audio has not reached the ring yet
        self.max_ahead_seconds = 0.0     # the most the decoder was ever ahead of the engine
        self.passthrough = False
        self.passthrough_refusal: str | None = None
        self.reencoded_frames = 0        # passthrough: 20 ms frames re-encoded where the frame size changed
        self.codec: str | None = None
        self.container_format: str | None = None
        self._fileobj: Any = None

    # -- public API --------------------------------------------------------------------------------
    @property
    def id(self) -> int:
        """Stable for the track's life, also after it moved onto an Opus passthrough ring."""
        return self._id

    @property
    def state(self) -> str:
        if self.error is not None:
            return "error"
        native = self._source.state
        if native in ("stopped", "ended"):
            return "ended"
        if self._loading:
            return "loading"
        return native

    @property
    def duration(self) -> float | None:
        return self._duration

    @property
    def seekable(self) -> bool | None:
        """``None`` until probed."""
        return self._seekable

    @property
    def position(self) -> float:
        played = self._source.frames_played - self._frames_base
        return self._pos_base + max(0, played) * 0.020

    @property
    def decoded_ahead(self) -> float:
        """Seconds decoded but not yet played."""
        return self._decoded_bytes / BYTES_PER_SECOND - (self.position - self._pos_base)

    def seek(self, seconds: float) -> None:
        """Continue from ``seconds`` (returns at once; the decode thread repositions between packets).

        What is buffered keeps playing until the audio at the target is decoded, then the ring is
        swapped in one step, so there is no gap; the decoded path lands on the exact sample, Opus
        passthrough on the 20 ms packet boundary nearest the target. Raises ConfigurationError for a
        negative target, one past ``duration``, an ended track, or an input known not to seek (live
        streams, servers without byte ranges); a seek asked before the probe on such an input is
        ignored with a warning in the ``telecom.sources`` log.
        """
        try:
            target = float(seconds)
        except (TypeError, ValueError):
            raise ConfigurationError(f"seek takes seconds, not {seconds!r}") from None
        if target < 0 or target != target:
            raise ConfigurationError(f"cannot seek to {seconds!r}")
        if self._seekable is False:
            raise ConfigurationError(f"{self.name} cannot seek (a live stream or a server without ranges)")
        if self._duration is not None and target > self._duration:
            raise ConfigurationError(f"seek to {target:g} s is past the end ({self._duration:.3f} s)")
        if self.state in ("ended", "error"):
            raise ConfigurationError("this track has ended")
        with self._cond:
            self._seek_to = target
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        fileobj = self._fileobj
        if fileobj is not None:
            fileobj.abort()              # a decode thread waiting on a stalled server returns now
        super().stop()
        with self._lock:
            never_played = not self._started
        if never_played and not self.done.done():
            self.done.set_result("ended")   # no connection will report the end of a ring never attached

    def stats(self) -> dict:
        out = super().stats()
        out.update(position=self.position, duration=self._duration, passthrough=self.passthrough,
                   decoded_ahead=self.decoded_ahead, reconnects=getattr(self._fileobj, "reconnect_count", 0))
        return out

    # -- engine/client side ------------------------------------------------------------------------
    def _attach(self, client: Any) -> None:
        super()._attach(client)
        with self._lock:
            source = self._source
            start = not self._started
            self._started = True
        try:
            client._conn.attach(source)       # no-op when client.play already attached this ring
        except TelecomError:
            pass
        if start:
            get_pool().submit(self)

    def handle_engine_event(self, kind: str, conn_id: int, value: int) -> None:
        if kind == EV_SOURCE_ENDED and value in self._retired:
            return                       # the PCM ring replaced by the Opus ring
        super().handle_engine_event(kind, conn_id, value)

    # -- worker side (decode thread) ---------------------------------------------------------------
    def _open_input(self) -> tuple[Any, Any]:
        fileobj, target = self._opener()
        self._fileobj = fileobj
        return fileobj, target

    def _check_stop(self) -> None:
        if self._stopping or self._source.state in ("stopped", "ended"):
            raise _Stop()

    def _probed(self, container: Any, stream: Any, fileobj: Any) -> None:
        self.codec = stream.codec_context.name
        self.container_format = container.format.name
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        live = fileobj is not None and fileobj.length is None
        self._duration = None if live else duration
        if fileobj is None:
            self._seekable = True
        else:
            self._seekable = bool(fileobj.seekable())
        log.debug("%s: %s in %s, duration %s, seekable %s", self.name, self.codec, self.container_format,
                  self._duration, self._seekable)

    def _opus_pipe_class(self, container: Any, stream: Any) -> Any:
        """The engine's Opus pipe class when the stream qualifies for passthrough, else None."""
        from telecom import playable as playable_mod
        from telecom.sources.demux import passthrough_refusal

        pipe_cls = getattr(playable_mod, "OpusPipe", None)
        if not self._passthrough_wanted:
            self.passthrough_refusal = "passthrough=False"
        elif pipe_cls is None:
            self.passthrough_refusal = "this engine has no Opus passthrough input"
        else:
            self.passthrough_refusal = passthrough_refusal(container, stream)
        return None if self.passthrough_refusal is not None else pipe_cls

    def _start_passthrough(self, pipe_cls: Any) -> Any:
        """Move the track onto an Opus ring (the PCM ring is still empty: nothing was decoded)."""
        pipe = pipe_cls(buffer_seconds=self.ahead_seconds)
        self._swap_source(pipe._source)
        self.passthrough = True
        return pipe

    def _swap_source(self, new: Any) -> None:
        engine = get_engine()
        with self._lock:
            old = self._source
            new.set_gain(self._volume / 100.0)
            if old.state == "paused":
                new.pause()
            self._source = new
            self._retired.discard(new.id)
            self._retired.add(old.id)
            clients = list(self._clients)
        engine.register_source(new.id, self)
        for client in clients:
            try:
                client._conn.attach(new)
            except TelecomError:
                pass
        old.end_input()                  # empty: the engine drops it at its next tick

    def _take_seek(self) -> float | None:
        with self._cond:
            target, self._seek_to = self._seek_to, None
        if self._stopping:
            raise _Stop()
        return target

    def _flush(self, target: float) -> None:
        """A seek was applied to the demuxer: the old audio keeps playing until the new is decoded."""
        self._pending.clear()
        self._flush_to = target

    def _apply_flush(self) -> None:
        # Only this thread writes the ring: once it is cleared nothing older can reach the engine, and
        # the engine cannot take a frame before the write that follows, so the bases below are exact.
        target, self._flush_to = self._flush_to, None
        self._source.clear()
        self._frames_base = self._source.frames_played
        self._pos_base = target if target is not None else self._pos_base
        self._decoded_bytes = 0

    def _wait_room(self, needed: int) -> None:
        source = self._source
        room = source.capacity - source.buffered
        # Sleep about as long as the media thread needs to drain what is missing (192 kB/s).
        delay = min(0.1, max(0.005, (needed - room) / BYTES_PER_SECOND))
        with self._cond:
            if self._stopping or self._seek_to is not None:
                return
            self._cond.wait(delay)

    def _note_written(self, nbytes: int) -> None:
        self._decoded_bytes += nbytes
        if self._loading:
            self._loading = False
        ahead = self.decoded_ahead
        if ahead > self.max_ahead_seconds:
            self.max_ahead_seconds = ahead

    def _write_pcm(self, data: bytes, final: bool = False) -> None:
        # Whole 20 ms frames only: the engine zero-pads a short frame, which mid-stream would be a click.
        self._pending += data
        whole = len(self._pending) if final else len(self._pending) - len(self._pending) % FRAME_BYTES
        if not whole:
            return
        chunk = bytes(self._pending[:whole])
        del self._pending[:whole]
        if self._flush_to is not None:
            self._apply_flush()
        view = memoryview(chunk)
        while view.nbytes:
            if self._stopping:
                raise _Stop()
            if self._seek_to is not None:
                return                   # this audio is before the seek target: drop it
            try:
                taken = self._source.write(view, True)
            except TelecomError:
                raise _Stop() from None  # stopped or ended under us
            if taken:
                self._note_written(taken)
                view = view[taken:]
            if view.nbytes:
                self._wait_room(view.nbytes)

    def _write_opus(self, sink: Any, packet: bytes) -> None:
        if self._flush_to is not None:
            self._apply_flush()
        while True:
            if self._stopping:
                raise _Stop()
            if self._seek_to is not None:
                return
            try:
                sink.send(packet)
            except BufferFull:
                self._wait_room(len(packet) + 2)
                continue
            except TelecomError:
                raise _Stop() from None
            self._note_written(FRAME_BYTES)   # one 20 ms frame
            return

    def _input_finished(self) -> None:
        if self._pending:
            self._write_pcm(b"", final=True)
        self._loading = False
        self._source.end_input()

    def _fail(self, error: SourceError) -> None:
        log.info("%s: %s", self.name, error)
        self.error = error
        if self._end_reason is None:
            self._end_reason = "error"
        self._loading = False
        get_engine().call_soon(self._report_error, error)

    def _report_error(self, error: SourceError) -> None:
        # io loop: the error event first, then the ring drains what it holds and the track ends.
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            report = getattr(client, "_playable_error", None)
            if report is not None:
                report(self, error)
        self._source.end_input()

    def _worker_done(self) -> None:
        log.debug("%s: decode thread done", self.name)


def file_opener(path: str) -> Any:
    def open_file() -> tuple[None, str]:
        if not os.path.exists(path):
            raise SourceError(f"{path} disappeared before it could be opened")
        return None, path
    return open_file


def url_opener(url: str, options: dict) -> Any:
    from telecom.sources.http import HttpFile

    def open_url() -> tuple[Any, Any]:
        fileobj = HttpFile(url, **options)
        try:
            fileobj.open()
        except BaseException:
            fileobj.close()
            raise
        return fileobj, fileobj
    return open_url


__all__ = ["Track", "DecodeError", "file_opener", "url_opener"]
