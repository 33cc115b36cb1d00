"""Outputs: where received audio goes — files, callbacks, iterators — and the muxer.

What it owns: :class:`Output` and its kinds (:meth:`Output.to_file` streams to disk with soundfile /
libsndfile while the call runs; :meth:`Output.to_callback`; :meth:`Output.to_queue`, a bounded sync and
async iterator of :class:`AudioFrame`), per-output sample-rate and channel conversion
(:class:`Resampler`, a streaming polyphase windowed-sinc filter), and :class:`Muxer`, everyone in the
channel mixed (natively, in the receive core) into one stream on a wall-clock timeline.

Frames reach outputs on telecom's output worker thread (``telecom-output``), never on the io loop. A
slow callback delays the other outputs, not audio decoding (the native queue between them is bounded
and counts what it drops). An output that raises is closed and reported as an ``error`` event.

File formats (libsndfile 1.1+): wav, flac, ogg (Vorbis), opus (Ogg/Opus), mp3. A per-user file has
silence inserted where the user paused, so its length matches wall-clock time from its first frame.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import math
import os
import queue
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

try:  # numpy comes with the "audio" extra; importing telecom must not need it
    import numpy as np
except ImportError:  # pragma: no cover - depends on the install
    np = None  # type: ignore[assignment]

from telecom.errors import ConfigurationError, TelecomError

log = logging.getLogger("telecom.output")

SAMPLE_RATE = 48000
CHANNELS = 2

# extension / format name -> (libsndfile major format, subtype)
_FORMATS = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
    "vorbis": ("OGG", "VORBIS"),
    "opus": ("OGG", "OPUS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
}
_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


@dataclass(frozen=True)
class AudioFrame:
    """One piece of received audio: ``pcm`` is s16le interleaved at ``sample_rate``/``channels``.

    ``user_id`` is None for a muxer's mixed stream. ``timestamp`` is Unix time (seconds) of the first
    sample on the receive timeline; ``time_ns`` the same on CLOCK_MONOTONIC.
    """

    user_id: int | None
    timestamp: float
    pcm: bytes
    sample_rate: int = SAMPLE_RATE
    channels: int = CHANNELS
    rtp_timestamp: int | None = None
    concealed: bool = False
    time_ns: int = 0
    ssrc: int | None = None

    @property
    def samples(self) -> int:
        """Samples per channel."""
        return len(self.pcm) // (2 * self.channels)

    @property
    def duration(self) -> float:
        return self.samples / self.sample_rate

    def array(self) -> np.ndarray:
        """The samples as an int16 array of shape (samples, channels)."""
        return np.frombuffer(self.pcm, dtype="<i2").reshape(-1, self.channels)


class Resampler:
    """Streaming rational resampler (polyphase, Kaiser-windowed sinc, 0.9 x the lower Nyquist).

    >>> r = Resampler(48000, 16000, channels=1)
    >>> r.process(np.zeros((960, 1))).shape
    (320, 1)
    """

    def __init__(self, src_rate: int, dst_rate: int, channels: int, zero_crossings: int = 16) -> None:
        if src_rate <= 0 or dst_rate <= 0:
            raise ConfigurationError("sample rates must be positive")
        g = math.gcd(src_rate, dst_rate)
        self.up, self.down = dst_rate // g, src_rate // g
        self.channels = channels
        span = max(self.up, self.down)
        taps = int(math.ceil(2 * zero_crossings * span / self.up))   # input samples per output
        n = taps * self.up
        fc = 0.45 / span                                               # cycles per high-rate sample
        t = np.arange(n) - (n - 1) / 2.0
        h = 2 * fc * np.sinc(2 * fc * t) * np.kaiser(n, 8.6) * self.up
        # phases[p, k] = h[p + k * up]: the k-th input tap of output phase p
        self._phases = h.reshape(taps, self.up).T.copy()
        self._taps = taps
        self._hist = np.zeros((taps - 1, channels))
        # high-rate index of the next output, relative to the history start: the first output is the
        # first input sample's (the zero history only feeds the filter's tail, it adds no samples)
        self._next = (taps - 1) * self.up

    def process(self, x: np.ndarray) -> np.ndarray:
        """``x``: (samples, channels) float; returns the resampled block (delay: taps/2 input samples)."""
        buf = np.concatenate([self._hist, x]) if len(self._hist) else x
        have = len(buf)
        # output m needs inputs up to floor(j/up) with j = next + m*down; newest tap index <= have-1
        last_j = (have - 1) * self.up
        count = 0 if self._next > last_j else (last_j - self._next) // self.down + 1
        if count:
            js = self._next + self.down * np.arange(count)
            base = js // self.up
            phase = js % self.up
            idx = base[:, None] - np.arange(self._taps)[None, :]
            valid = idx >= 0
            gathered = buf[np.clip(idx, 0, None)] * valid[:, :, None]
            y = np.einsum("mkc,mk->mc", gathered, self._phases[phase])
            self._next += count * self.down
        else:
            y = np.zeros((0, self.channels))
        # keep the last taps-1 inputs; rebase the output index onto the new history start
        keep = min(self._taps - 1, have)
        drop = have - keep
        self._hist = buf[drop:]
        self._next -= drop * self.up
        return y


def _convert_channels(x: np.ndarray, channels: int) -> np.ndarray:
    if x.shape[1] == channels:
        return x
    if channels == 1:
        return x.mean(axis=1, keepdims=True)
    return np.repeat(x[:, :1], channels, axis=1)


class Output:
    """Where received audio goes. Create one with :meth:`to_file`, :meth:`to_callback`,
    :meth:`to_queue` (or :meth:`muxer`), then ``client.get_user(id).set_output(output)`` or
    ``muxer.set_output(output)``. Thread-safe; :meth:`close` finalises it (idempotent)."""

    def __init__(self, *, sample_rate: int = SAMPLE_RATE, channels: int = CHANNELS,
                 fill_gaps: bool = False) -> None:
        if np is None:  # pragma: no cover - depends on the install
            raise ConfigurationError("outputs need numpy (pip install 'telecom[audio]')")
        if not isinstance(sample_rate, int) or not 4000 <= sample_rate <= 192000:
            raise ConfigurationError(f"sample_rate must be an int in 4000..192000, not {sample_rate!r}")
        if channels not in (1, 2):
            raise ConfigurationError(f"channels must be 1 or 2, not {channels!r}")
        self.sample_rate = sample_rate
        self.channels = channels
        self.fill_gaps = fill_gaps
        self._lock = threading.RLock()
        self._closed = False
        self._resampler = (Resampler(SAMPLE_RATE, sample_rate, channels)
                           if sample_rate != SAMPLE_RATE else None)
        self._next_ns: int | None = None     # where the previous frame ended (fill_gaps)
        self.frames = 0
        self.samples_written = 0
        self.gap_samples = 0
        _open_outputs.add(self)

    # -- constructors --------------------------------------------------------------------------------
    @staticmethod
    def to_file(path: str | os.PathLike, *, format: str | None = None, sample_rate: int = SAMPLE_RATE,
                channels: int = CHANNELS) -> "FileOutput":
        """Stream to an audio file while the call runs: wav, flac, ogg (Vorbis), opus or mp3 (from
        ``format`` or the file extension).

        >>> client.get_user(uid).set_output(Output.to_file("bob.flac"))    # doctest: +SKIP
        """
        return FileOutput(path, format=format, sample_rate=sample_rate, channels=channels)

    @staticmethod
    def to_callback(fn: Callable[[AudioFrame], Any], *, sample_rate: int = SAMPLE_RATE,
                    channels: int = CHANNELS) -> "CallbackOutput":
        """Call ``fn(frame)`` on telecom's output thread for every frame (keep it short)."""
        return CallbackOutput(fn, sample_rate=sample_rate, channels=channels)

    @staticmethod
    def to_queue(maxsize: int = 500, *, sample_rate: int = SAMPLE_RATE, channels: int = CHANNELS
                 ) -> "QueueOutput":
        """A bounded queue of frames to iterate: ``for frame in q`` or ``async for frame in q``
        (ends when the output is closed). When full, new frames are dropped and counted."""
        return QueueOutput(maxsize, sample_rate=sample_rate, channels=channels)

    @staticmethod
    def muxer(include_self: bool = False, *, delay: float = 0.2) -> "Muxer":
        """Everyone in the channel mixed into one stream on a wall-clock timeline.

        >>> m = Output.muxer(); m.set_output(Output.to_file("all.wav"))   # doctest: +SKIP
        >>> client.set_output_muxer(m)                                   # doctest: +SKIP
        """
        return Muxer(include_self=include_self, delay=delay)

    # -- delivery (output worker thread) -----------------------------------------------------------
    def _deliver(self, frame: AudioFrame) -> None:
        with self._lock:
            if self._closed:
                return
            x = np.frombuffer(frame.pcm, dtype="<i2").reshape(-1, CHANNELS)
            if self.fill_gaps and frame.time_ns:
                self._fill_gap(frame.time_ns)
                self._next_ns = frame.time_ns + len(x) * 1_000_000_000 // SAMPLE_RATE
            pcm = self._convert(x)
            if pcm is None:
                return
            self.frames += 1
            self.samples_written += len(pcm) // (2 * self.channels)
            self._write(AudioFrame(frame.user_id, frame.timestamp, pcm, self.sample_rate, self.channels,
                                   frame.rtp_timestamp, frame.concealed, frame.time_ns, frame.ssrc))

    def _fill_gap(self, time_ns: int) -> None:
        if self._next_ns is None:
            return
        gap = (time_ns - self._next_ns) * SAMPLE_RATE // 1_000_000_000
        # fill only real pauses (> 10 ms): arrival-clock anchors of spurts wobble by a few ms
        if gap <= SAMPLE_RATE // 100:
            return
        self.gap_samples += gap
        chunk = SAMPLE_RATE  # one second at a time: a long pause must not allocate its whole length
        while gap > 0:
            n = min(gap, chunk)
            pcm = self._convert(np.zeros((n, CHANNELS), dtype="<i2"))
            if pcm:
                self.samples_written += len(pcm) // (2 * self.channels)
                self._write(AudioFrame(None, 0.0, pcm, self.sample_rate, self.channels))
            gap -= n

    def _convert(self, x: np.ndarray) -> bytes | None:
        if self._resampler is None and self.channels == CHANNELS:
            return x.tobytes()
        y = _convert_channels(x.astype(np.float64), self.channels)
        if self._resampler is not None:
            y = self._resampler.process(y)
        if not len(y):
            return None
        return np.clip(np.round(y), -32768, 32767).astype("<i2").tobytes()

    def _write(self, frame: AudioFrame) -> None:  # pragma: no cover - every kind overrides it
        raise NotImplementedError

    # -- closing -----------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Finalise (files get a valid header/trailer); later frames are ignored. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                self._finish()
            finally:
                # only now: a thread that sees ``closed`` may read the finished file at once
                self._closed = True

    def _finish(self) -> None:
        pass

    def __enter__(self) -> "Output":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def stats(self) -> dict:
        return {"frames": self.frames, "samples_written": self.samples_written,
                "gap_samples": self.gap_samples, "closed": self._closed}


# Every output not yet closed, so that process exit finalises them (a recording left open when the
# interpreter exits mid-call must still be a valid file). Weak: a dropped output is not kept alive.
_open_outputs: "weakref.WeakSet[Output]" = weakref.WeakSet()


@atexit.register
def _close_outputs_at_exit() -> None:
    for output in list(_open_outputs):
        try:
            output.close()
        except Exception:  # noqa: BLE001 - one broken output must not keep the others open
            log.exception("closing %r at exit failed", output)


class FileOutput(Output):
    """An audio file written as frames arrive (see :meth:`Output.to_file`)."""

    def __init__(self, path: str | os.PathLike, *, format: str | None = None,
                 sample_rate: int = SAMPLE_RATE, channels: int = CHANNELS) -> None:
        super().__init__(sample_rate=sample_rate, channels=channels, fill_gaps=True)
        try:
            import soundfile
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigurationError("Output.to_file needs the soundfile package "
                                     "(pip install 'telecom[audio]')") from exc
        self.path = os.fspath(path)
        name = (format or os.path.splitext(self.path)[1].lstrip(".")).lower()
        if name not in _FORMATS:
            raise ConfigurationError(f"unsupported audio format {name!r}; use one of {sorted(_FORMATS)}")
        major, subtype = _FORMATS[name]
        if subtype == "OPUS" and sample_rate not in _OPUS_RATES:
            raise ConfigurationError(f"Ogg/Opus needs a sample rate in {_OPUS_RATES}, not {sample_rate}")
        if not soundfile.check_format(major, subtype):
            raise ConfigurationError(f"this libsndfile ({soundfile.__libsndfile_version__}) cannot write "
                                     f"{major}/{subtype}")
        self.format = name
        try:
            self._file = soundfile.SoundFile(self.path, "w", samplerate=sample_rate, channels=channels,
                                             format=major, subtype=subtype)
        except Exception as exc:  # soundfile raises RuntimeError/LibsndfileError
            raise ConfigurationError(f"cannot open {self.path!r} for writing: {exc}") from exc

    def _write(self, frame: AudioFrame) -> None:
        self._file.buffer_write(frame.pcm, dtype="int16")

    def _finish(self) -> None:
        file = getattr(self, "_file", None)   # absent when opening the file failed
        if file is not None:
            file.close()

    def __repr__(self) -> str:
        return f"<FileOutput {self.path!r} {self.format} {self.sample_rate} Hz x{self.channels}>"


class CallbackOutput(Output):
    """Calls a function per frame (see :meth:`Output.to_callback`)."""

    def __init__(self, fn: Callable[[AudioFrame], Any], *, sample_rate: int = SAMPLE_RATE,
                 channels: int = CHANNELS) -> None:
        if not callable(fn):
            raise ConfigurationError("to_callback() needs a callable")
        super().__init__(sample_rate=sample_rate, channels=channels)
        self._fn = fn

    def _write(self, frame: AudioFrame) -> None:
        self._fn(frame)


_END = object()


class QueueOutput(Output):
    """A bounded frame queue, iterable with ``for`` and ``async for`` (see :meth:`Output.to_queue`)."""

    def __init__(self, maxsize: int = 500, *, sample_rate: int = SAMPLE_RATE,
                 channels: int = CHANNELS) -> None:
        if maxsize < 1:
            raise ConfigurationError("maxsize must be >= 1")
        super().__init__(sample_rate=sample_rate, channels=channels)
        self._queue: queue.Queue = queue.Queue(maxsize + 1)   # +1: room for the end marker
        self._maxsize = maxsize
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._waiters_lock = threading.Lock()
        self.dropped = 0

    def _write(self, frame: AudioFrame) -> None:
        if self._queue.qsize() >= self._maxsize:
            self.dropped += 1
            return
        self._queue.put_nowait(frame)
        self._wake_async()

    def _finish(self) -> None:
        try:
            self._queue.put_nowait(_END)
        except queue.Full:  # pragma: no cover - the +1 slot is reserved for it
            pass
        self._wake_async()

    def _wake_async(self) -> None:
        # async consumers wait on a future of their own loop; wake them from the output thread
        if not self._waiters:
            return
        with self._waiters_lock:
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(lambda f=fut: f.done() or f.set_result(None))
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass

    def get(self, timeout: float | None = None) -> AudioFrame | None:
        """The next frame (blocking up to ``timeout``); None once closed and drained.
        Raises :class:`TimeoutError` (``queue.Empty``) on timeout."""
        item = self._queue.get(timeout=timeout)
        if item is _END:
            self._queue.put_nowait(_END)   # every later get() sees the end too
            return None
        return item

    def __iter__(self) -> Iterator[AudioFrame]:
        while (frame := self.get()) is not None:
            yield frame

    def __aiter__(self) -> "QueueOutput":
        return self

    async def __anext__(self) -> AudioFrame:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                loop = asyncio.get_running_loop()
                fut = loop.create_future()
                with self._waiters_lock:
                    self._waiters.append((loop, fut))
                if self._queue.empty():          # re-checked after registering: no lost wake-up
                    await fut
                continue
            if item is _END:
                self._queue.put_nowait(_END)
                raise StopAsyncIteration
            return item

    def stats(self) -> dict:
        return dict(super().stats(), dropped=self.dropped, queued=self._queue.qsize())


class Muxer:
    """Everyone in the channel, mixed into one stream on a wall-clock timeline (see
    :meth:`Output.muxer`). The timeline starts when the muxer is first attached to a client; each
    20 ms block is mixed natively and emitted ``delay`` seconds after it ends (the time a late
    speaker has to arrive), silence included. Speakers are placed by RTP timestamp within a talk
    spurt and by arrival time across spurts. ``include_self`` also mixes what this client sends —
    every playable, as mixed and sent by the media engine, placed at its send time."""

    def __init__(self, *, include_self: bool = False, delay: float = 0.2) -> None:
        if not 0.02 <= delay <= 2.0:
            raise ConfigurationError("delay must be between 0.02 and 2 seconds")
        self.include_self = bool(include_self)
        self.delay = float(delay)
        self._outputs: list[Output] = []
        self._lock = threading.Lock()
        self._id: int | None = None
        self._closed = False
        self._taps: list[_SelfTap] = []
        self.blocks = 0

    @property
    def id(self) -> int | None:
        return self._id

    def set_output(self, output: Output) -> Output:
        """Send the mixed stream to ``output`` (replaces earlier ones; see :meth:`add_output`)."""
        if not isinstance(output, Output):
            raise ConfigurationError(f"set_output() takes an Output, not {type(output).__name__}")
        with self._lock:
            self._outputs = [output]
        return output

    def add_output(self, output: Output) -> Output:
        if not isinstance(output, Output):
            raise ConfigurationError(f"add_output() takes an Output, not {type(output).__name__}")
        with self._lock:
            self._outputs.append(output)
        return output

    def _register(self) -> int:
        from telecom.receive import get_receiver

        with self._lock:
            if self._closed:
                raise TelecomError("this muxer is closed")
            if self._id is None:
                self._id = get_receiver().add_muxer(self, int(self.delay * 1e9))
            return self._id

    def _poll_taps(self, now: int) -> None:
        for tap in list(self._taps):
            tap.poll(now)

    def _deliver_block(self, time_ns: int, timestamp: float, pcm: bytes) -> None:
        with self._lock:
            outputs = list(self._outputs)
        self.blocks += 1
        frame = AudioFrame(None, timestamp, pcm, SAMPLE_RATE, CHANNELS, None, False, time_ns, None)
        for output in outputs:
            output._deliver(frame)

    def add_pcm(self, time_ns: int, pcm: bytes) -> None:
        """Mix 48 kHz s16le stereo ``pcm`` in at ``time_ns`` (CLOCK_MONOTONIC, see
        :func:`telecom.receive.now_ns`): e.g. what this client sends."""
        from telecom.receive import get_receiver

        if self._id is not None and not self._closed:
            get_receiver().core.mux_add_pcm(self._id, time_ns, pcm)

    def stats(self) -> dict | None:
        from telecom.receive import get_receiver

        return None if self._id is None else get_receiver().core.muxer_stats(self._id)

    def close(self) -> None:
        """Stop mixing and close the outputs (files are finalised). Idempotent."""
        from telecom.receive import get_receiver

        with self._lock:
            if self._closed:
                return
            self._closed = True
            mux_id, outputs = self._id, list(self._outputs)
        if mux_id is not None:
            get_receiver().remove_muxer(mux_id)
        for output in outputs:
            output.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return f"<Muxer id={self._id} include_self={self.include_self} outputs={len(self._outputs)}>"


class _SelfTap:
    """Feeds what a client sends into its muxer (``include_self``).

    The media engine copies every audio frame it sends on the client's connection — the mix it
    encoded (every playable, at its volume and the client's), or a passed-through Opus packet,
    decoded — stamped with the frame's send deadline (``NativeConnection.set_tap``). The output
    worker drains that ring every batch (20 ms) into the muxer, well inside the muxer's ``delay``.
    Only tapped connections pay: a 3.8 KB copy per frame, plus an Opus decode per passed-through one.
    """

    def __init__(self, client: Any, muxer: Muxer) -> None:
        self._conn = client._conn
        self._muxer = muxer
        self.dropped = 0
        self._conn.set_tap(True)
        muxer._taps.append(self)

    def poll(self, now: int) -> None:
        """Mix what was sent since the last poll (output worker thread)."""
        try:
            frames, dropped = self._conn.tap_read()
        except TelecomError:                 # the connection closed meanwhile
            self.detach()
            return
        self.dropped += dropped
        for time_ns, pcm in frames:
            self._muxer.add_pcm(time_ns, pcm)

    def detach(self) -> None:
        try:
            self._conn.set_tap(False)
        except TelecomError:
            pass
        try:
            self._muxer._taps.remove(self)
        except ValueError:
            pass


__all__ = ["AudioFrame", "CallbackOutput", "FileOutput", "Muxer", "Output", "QueueOutput", "Resampler"]
