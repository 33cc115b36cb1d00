"""Playables: what a :class:`~telecom.Client` plays.

This module owns the Python side of every source: its state, volume, ``done`` future and the events it
raises. The samples themselves live in native ring buffers (:class:`telecom._fast.engine.PcmSource`)
that the media threads read without the GIL; nothing here runs per frame.

Implemented so far: :meth:`Playable.from_pcm_pipe`. URL/file sources (PyAV) and Opus passthrough are
later work and are not exposed yet.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from typing import Any

from telecom.engine import EV_SOURCE_ENDED, get_engine
from telecom.errors import BufferFull, ConfigurationError, ConnectTimeout

SAMPLE_RATE = 48000
CHANNELS = 2
FRAME_BYTES = 3840  # 20 ms of 48 kHz s16le stereo


def _check_percent(percent: float) -> float:
    try:
        value = float(percent)
    except (TypeError, ValueError):
        raise ConfigurationError(f"volume must be a number of percent, not {percent!r}") from None
    if not 0.0 <= value <= 200.0:
        raise ConfigurationError(f"volume must be 0..200 %, not {percent!r}")
    return value


class Playable:
    """A source of audio. Create one with a ``from_*`` constructor, then ``client.play(playable)``.

    Every method returns at once and is thread-safe. ``done`` is a
    :class:`concurrent.futures.Future` resolved when the playable ends (stopped or drained).
    """

    def __init__(self, source: Any) -> None:
        self._source = source
        self._volume = 100.0
        self._lock = threading.Lock()
        self._clients: list[Any] = []
        self._end_reason: str | None = None   # track_end's reason once known (see end_reason)
        self.error: BaseException | None = None
        self.done: Future = Future()
        get_engine().register_source(source.id, self)

    # -- constructors ------------------------------------------------------------------------------
    @staticmethod
    def from_url(url: str, **options: Any) -> "Playable":
        """Play anything FFmpeg reads over http(s): decoded in the background by PyAV, a bounded time
        ahead (``ahead_seconds``, default 5); 20 ms Opus in Ogg/WebM is passed through undecoded.

        Options: ``ahead_seconds``, ``connect_timeout`` (10 s), ``read_timeout`` (15 s), ``reconnects`` (3),
        ``ssl`` (an SSLContext or CA file; verification is always on), ``headers``, ``max_redirects``,
        ``passthrough``. Only the arguments are checked here; fetch and format errors arrive as
        ``track_error`` then ``track_end`` (reason ``error``) events and on ``done``.

        >>> track = client.play(Playable.from_url("https://example.com/song.ogg"))  # doctest: +SKIP
        """
        from telecom.sources import open_url

        return open_url(url, **options)

    @staticmethod
    def from_file(path: Any, **options: Any) -> "Playable":
        """Play a local audio file (see :meth:`from_url`); a missing path raises SourceNotFound at once."""
        from telecom.sources import open_file

        return open_file(path, **options)

    @staticmethod
    def from_pcm_pipe(*, buffer_seconds: float = 10.0, sample_rate: int = SAMPLE_RATE, channels: int = CHANNELS,
                      sample_format: str = "s16") -> "PcmPipe":
        """A pipe you push 48 kHz s16le stereo PCM into with :meth:`PcmPipe.send`.

        >>> pipe = Playable.from_pcm_pipe()
        >>> client.play(pipe)            # doctest: +SKIP
        >>> pipe.send(pcm_bytes)         # any byte count; frames are cut internally  # doctest: +SKIP
        """
        if (sample_rate, channels, sample_format) != (SAMPLE_RATE, CHANNELS, "s16"):
            from telecom.sources.convert import ConvertingPcmPipe

            return ConvertingPcmPipe(buffer_seconds=buffer_seconds, sample_rate=sample_rate,
                                     channels=channels, sample_format=sample_format)
        return PcmPipe(buffer_seconds=buffer_seconds)

    # -- control -----------------------------------------------------------------------------------
    @property
    def id(self) -> int:
        return self._source.id

    @property
    def state(self) -> str:
        """``"playing"``, ``"paused"``, ``"stopped"`` or ``"ended"``."""
        return self._source.state

    def pause(self) -> None:
        """Pause; the client sends its 5-frame silence tail and clears Speaking if nothing else plays."""
        self._source.pause()

    def resume(self) -> None:
        self._source.resume()

    def stop(self) -> None:
        """Stop now and drop what is buffered; ``done`` resolves."""
        if self._end_reason is None:
            self._end_reason = "stopped"
        self._source.stop()

    @property
    def end_reason(self) -> str:
        """Why it ended (``track_end``'s ``reason``): finished, stopped, replaced or error."""
        return self._end_reason or "finished"

    @property
    def position(self) -> float:
        """Seconds played (from the engine's frame counter; URL/file tracks count from the last seek)."""
        return self._source.frames_played * 0.020

    @property
    def duration(self) -> float | None:
        """Length in seconds when known (``None`` for pipes and live streams)."""
        return None

    def seek(self, seconds: float) -> None:
        """Jump to ``seconds`` (URL/file tracks that allow it); ConfigurationError otherwise."""
        raise ConfigurationError(f"{type(self).__name__} cannot seek")

    def set_volume(self, percent: float) -> None:
        """Volume of this playable in percent (0..200), ramped over one 20 ms frame, on top of the client's."""
        value = _check_percent(percent)
        self._volume = value
        self._source.set_gain(value / 100.0)

    @property
    def volume(self) -> float:
        return self._volume

    @property
    def frames_played(self) -> int:
        return self._source.frames_played

    @property
    def underruns(self) -> int:
        """20 ms ticks at which this playable was playing on a speaking client but had no data."""
        return self._source.underruns

    def stats(self) -> dict:
        return {
            "state": self.state,
            "frames_played": self.frames_played,
            "underruns": self.underruns,
            "buffered_bytes": self._source.buffered,
            "volume": self._volume,
        }

    # -- engine side -------------------------------------------------------------------------------
    def _attach(self, client: Any) -> None:
        with self._lock:
            self._clients.append(client)

    def handle_engine_event(self, kind: str, conn_id: int, value: int) -> None:
        if kind != EV_SOURCE_ENDED:
            return
        with self._lock:
            clients = list(self._clients)
            self._clients.clear()
        if not self.done.done():
            if self.error is not None:
                self.done.set_exception(self.error)
            else:
                self.done.set_result(self.state)
        for client in clients:
            client._playable_ended(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} id={self.id} state={self.state} volume={self._volume:g}%>"


class PcmPipe(Playable):
    """Raw PCM pushed by the application: 48 kHz, signed 16-bit little-endian, stereo, interleaved.

    The buffer holds ``buffer_seconds`` of audio. :meth:`send` takes all of the data or none of it:
    when it does not fit, it raises :class:`~telecom.BufferFull` and nothing is lost or reordered; wait
    for room with :meth:`wait_writable` (blocking) or ``await pipe.asend(data)``. :meth:`close` says no
    more data will come: what is buffered plays out (the last partial frame padded with silence), then
    the pipe ends. When the buffer runs dry while playing, the client sends silence frames and counts
    underruns; it does not stall, and resumes as soon as data arrives.
    """

    def __init__(self, *, buffer_seconds: float = 10.0) -> None:
        if not 0.02 <= buffer_seconds <= 600:
            raise ConfigurationError("buffer_seconds must be between 0.02 and 600")
        engine = get_engine()
        capacity = int(buffer_seconds * SAMPLE_RATE) * CHANNELS * 2
        capacity = max(FRAME_BYTES, capacity - capacity % 4)
        super().__init__(engine.new_source(capacity))

    @property
    def capacity(self) -> int:
        """Buffer size in bytes."""
        return self._source.capacity

    @property
    def buffered(self) -> int:
        """Bytes waiting to be played."""
        return self._source.buffered

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Queue PCM (any byte count). Raises :class:`~telecom.BufferFull` if it does not fit."""
        view = memoryview(data).cast("B")
        if not view.nbytes:
            return
        if view.nbytes > self.capacity:
            raise ConfigurationError(
                f"{view.nbytes} bytes can never fit a {self.capacity}-byte pipe; send smaller pieces")
        if not view.contiguous:
            view = memoryview(bytes(view))
        if self._source.write(view) == 0:
            raise BufferFull(f"the pipe holds {self.buffered} of {self.capacity} bytes; "
                             f"{view.nbytes} more do not fit")

    def wait_writable(self, nbytes: int, timeout: float | None = None) -> None:
        """Block until ``nbytes`` fit in the buffer (or raise ConnectTimeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.capacity - self.buffered < nbytes:
            if self.state in ("stopped", "ended"):
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise ConnectTimeout(f"no room for {nbytes} bytes within {timeout} s")
            time.sleep(0.005)

    async def asend(self, data: bytes | bytearray | memoryview) -> None:
        """Queue PCM, waiting (asynchronously) for room when the buffer is full."""
        view = memoryview(data).cast("B")
        while True:
            try:
                self.send(view)
                return
            except BufferFull:
                await asyncio.sleep(0.01)

    def close(self) -> None:
        """No more data: play what is buffered, then end."""
        self._source.end_input()

