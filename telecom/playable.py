"""Playables: what a :class:`~telecom.Client` plays.

This module owns the Python side of every source: its state, volume, ``done`` future and the events it
raises. The samples themselves live in native ring buffers (:class:`telecom._fast.engine.PcmSource`)
that the media threads read without the GIL; nothing here runs per frame.

Implemented here: :meth:`Playable.from_pcm_pipe`, and the Opus passthrough input
:meth:`Playable.from_opus_pipe` / :meth:`Playable.from_opus_packets` (:class:`OpusPipe`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from typing import Any, Iterable, Iterator

from telecom.engine import EV_SOURCE_ENDED, get_engine
from telecom.errors import BufferFull, CodecError, ConfigurationError, ConnectTimeout, TelecomError

log = logging.getLogger("telecom.playable")

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

    @staticmethod
    def from_opus_pipe(*, buffer_seconds: float = 10.0) -> "OpusPipe":
        """A pipe you push ready Opus packets into (48 kHz, 20 ms each) with :meth:`OpusPipe.send`.

        They go out without decoding when nothing else plays and all volumes are 100 %.

        >>> pipe = Playable.from_opus_pipe()
        >>> client.play(pipe)            # doctest: +SKIP
        >>> pipe.send(opus_packet)       # one 20 ms packet per call  # doctest: +SKIP
        """
        return OpusPipe(buffer_seconds=buffer_seconds)

    @staticmethod
    def from_opus_packets(packets: Iterable[bytes], *, buffer_seconds: float = 1.0) -> "OpusPipe":
        """Play an iterable of ready 20 ms Opus packets (e.g. read from an Ogg file), then end.

        A shared feeder thread keeps ``buffer_seconds`` queued, waiting for room when the queue is
        full. The iterable is consumed on that thread: it should not block for long (an application
        reading from the network should push into :meth:`from_opus_pipe` itself). If it raises, or
        yields something that is not a 20 ms Opus packet, the playable stops with that ``error``.

        >>> client.play(Playable.from_opus_packets(packets))   # doctest: +SKIP
        """
        pipe = OpusPipe(buffer_seconds=buffer_seconds)
        _feeder().add(pipe, iter(packets))
        return pipe

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


class OpusPipe(Playable):
    """Ready Opus packets pushed by the application: 48 kHz, 20 ms each, one packet per :meth:`send`.

    When this pipe is the only thing playing on a client and both volumes are 100 %, its packets go
    to the wire as they are (no decode, no encode: ~60x cheaper). Otherwise, tick by tick, they are
    decoded, mixed and re-encoded; switching either way loses no frame. Same control as
    :class:`PcmPipe`: ``send`` takes a packet or raises :class:`~telecom.BufferFull` (nothing is
    taken), ``close`` plays out what is queued and ends, ``pause``/``resume``/``stop``/``set_volume``.
    A packet that is not one 20 ms Opus packet of 1..1275 bytes raises :class:`~telecom.CodecError`.
    """

    def __init__(self, *, buffer_seconds: float = 10.0) -> None:
        if not 0.02 <= buffer_seconds <= 600:
            raise ConfigurationError("buffer_seconds must be between 0.02 and 600")
        super().__init__(get_engine().new_opus_source(max(1, round(buffer_seconds / 0.020))))

    @property
    def capacity(self) -> int:
        """Queue size in packets (20 ms each)."""
        return self._source.capacity

    @property
    def buffered(self) -> int:
        """Packets waiting to be sent."""
        return self._source.buffered

    def send(self, packet: bytes | bytearray | memoryview) -> None:
        """Queue one 20 ms Opus packet. Raises BufferFull if the queue is full, CodecError if invalid."""
        if not self._source.push(_as_bytes_view(packet)):
            raise BufferFull(f"the pipe holds {self.buffered} of {self.capacity} packets")

    def send_many(self, packets: Iterable[bytes]) -> int:
        """Queue packets in order until the queue is full; returns how many were taken.

        All are validated first: an invalid one raises CodecError and queues nothing.
        """
        return self._source.push_many([_as_bytes_view(p) for p in packets])

    def wait_writable(self, packets: int = 1, timeout: float | None = None) -> None:
        """Block until ``packets`` more fit in the queue (or raise ConnectTimeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.capacity - self.buffered < packets:
            if self.state in ("stopped", "ended"):
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise ConnectTimeout(f"no room for {packets} packets within {timeout} s")
            time.sleep(0.005)

    async def asend(self, packet: bytes | bytearray | memoryview) -> None:
        """Queue a packet, waiting (asynchronously) for room when the queue is full."""
        while True:
            try:
                self.send(packet)
                return
            except BufferFull:
                await asyncio.sleep(0.01)

    def close(self) -> None:
        """No more packets: send what is queued, then end."""
        self._source.end_input()

    def stats(self) -> dict:
        out = super().stats()
        out["buffered_packets"] = out.pop("buffered_bytes", self.buffered)
        out["passthrough_frames"] = self._source.passthrough_frames
        out["decoded_frames"] = self._source.decoded_frames
        return out

    def _fail(self, error: BaseException) -> None:
        """The feeder's iterable failed: report it (``error``, track_error), play out what is queued, end."""
        self.error = error
        if getattr(self, "_end_reason", None) is None:
            self._end_reason = "error"
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            report = getattr(client, "_playable_error", None)
            if report is not None:
                get_engine().call_soon(report, self, error)
        self._source.end_input()


def _as_bytes_view(packet: Any) -> memoryview:
    try:
        view = memoryview(packet)
    except TypeError:
        raise CodecError(f"an Opus packet is bytes, not {type(packet).__name__}") from None
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    return view if view.contiguous else memoryview(bytes(view))


class _OpusFeeder:
    """One daemon thread that keeps every :meth:`Playable.from_opus_packets` pipe topped up.

    Each round it moves as many packets from each iterator as fit (never more: backpressure), then
    sleeps a quarter of the smallest buffer (at most 100 ms). One thread for all pipes: a thousand
    passthrough playables must not mean a thousand threads.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: list[list[Any]] = []     # [pipe, iterator, pending packet or None]
        self._thread = threading.Thread(target=self._run, name="telecom-opus-feeder", daemon=True)
        self._thread.start()

    def add(self, pipe: OpusPipe, iterator: Iterator[bytes]) -> None:
        with self._cond:
            self._items.append([pipe, iterator, None])
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                items = list(self._items)
            finished = [item for item in items if not self._safe_top_up(item)]
            nap = min((item[0].capacity for item in items), default=50) * 0.020 / 4
            with self._cond:
                for item in finished:
                    self._items.remove(item)
                if finished and not self._items:
                    continue
            time.sleep(min(0.1, max(0.005, nap)))

    @staticmethod
    def _safe_top_up(item: list[Any]) -> bool:
        try:
            return _OpusFeeder._top_up(item)
        except Exception as exc:  # noqa: BLE001 - a bug here must not stop the other pipes' feeding
            log.exception("Opus feeder failed for %r", item[0])
            item[0]._fail(exc)
            return False

    @staticmethod
    def _top_up(item: list[Any]) -> bool:
        """Feed one pipe; False once it is done (input exhausted, failed, or stopped)."""
        pipe, iterator, pending = item
        if pipe.state in ("stopped", "ended"):
            return False
        room = pipe.capacity - pipe.buffered
        batch = [pending] if pending is not None else []
        item[2] = None
        try:
            while len(batch) < room:
                batch.append(_as_bytes_view(next(iterator)))
        except StopIteration:
            try:
                taken = pipe.send_many(batch) if batch else 0
            except (CodecError, TelecomError) as exc:
                return _OpusFeeder._refuse(pipe, batch, exc)
            if taken < len(batch):
                item[2:] = [None]
                item[1] = iter(batch[taken:])   # the rest waits for room, then the pipe closes
                return True
            pipe.close()
            return False
        except Exception as exc:  # noqa: BLE001 - the application's iterable failed: the track ends with it
            for view in batch:           # what it gave before failing still plays (the queue had room)
                pipe.send(view)
            pipe._fail(exc)
            return False
        try:
            taken = pipe.send_many(batch)
        except (CodecError, TelecomError) as exc:
            return _OpusFeeder._refuse(pipe, batch, exc)
        if taken < len(batch):
            # Room shrank? Nothing was lost: keep the rest for the next round, in order.
            rest = batch[taken:]
            item[2] = rest[0]
            if len(rest) > 1:
                item[1] = _chain(rest[1:], iterator)
        return True

    @staticmethod
    def _refuse(pipe: OpusPipe, batch: list[memoryview], exc: Exception) -> bool:
        if pipe.state in ("stopped", "ended"):
            return False                      # stopped by the application meanwhile: not an error
        # Queue the packets before the bad one so the track plays up to the error, then fail.
        for view in batch:
            try:
                pipe.send(view)
            except Exception:  # noqa: BLE001 - reported below
                break
        pipe._fail(exc if isinstance(exc, CodecError) else CodecError(str(exc)))
        return False


def _chain(first: list[Any], rest: Iterator[Any]) -> Iterator[Any]:
    yield from first
    yield from rest


_feeder_instance: _OpusFeeder | None = None
_feeder_lock = threading.Lock()


def _feeder() -> _OpusFeeder:
    global _feeder_instance
    with _feeder_lock:
        if _feeder_instance is None:
            _feeder_instance = _OpusFeeder()
        return _feeder_instance
