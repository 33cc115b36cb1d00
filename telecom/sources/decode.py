"""Decode workers: PyAV demux/decode/resample of URL and file playables, a bounded time ahead.

What it owns: the decode threads and the loop each runs for one track — open the input (an
:class:`~telecom.sources.http.HttpFile` or a local path), pick the first audio stream, then either hand
its Opus packets to the engine's passthrough ring (see :mod:`telecom.sources.demux`) or decode and
resample them to 48 kHz s16 stereo into the track's PCM ring; seeks; the end of input; errors.

Threads: **one thread per playing track, with a process-wide bound** (``max_decoders``, default 64;
tracks beyond it wait in "loading" until a thread frees). Why not a shared pool: PyAV pulls its input
synchronously through the file object's ``read()``, so a track waiting on a slow server holds whatever
thread decodes it; in a small shared pool one stalled stream would starve the decode-ahead of every
other track on that worker. A thread per track costs nothing while it waits (it sleeps on a condition or
in ``recv``), and its memory is the ring plus PyAV's 32 KiB I/O buffer and one decoded frame.

Decode-ahead is bounded by the ring itself: it holds ``ahead_seconds`` (default 5 s) of PCM, and the
worker writes into it only as the media threads drain it, so a worker is never more than
``ahead_seconds`` plus one decoded frame (≤ 0.1 s for the common codecs) ahead of what has been played,
and memory stays flat however long the track is.

What it must not do: run on the io loop or a media thread, or raise out of the thread: every failure
becomes the track's error (``track_error`` event, ``done`` exception).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from typing import TYPE_CHECKING, Any

from telecom.errors import ConfigurationError, SourceError

if TYPE_CHECKING:
    from telecom.sources.track import Track

log = logging.getLogger("telecom.sources")

BYTES_PER_SECOND = 48000 * 4


class DecodeError(SourceError):
    """The data could not be demuxed or decoded: unsupported format, corrupt or truncated file."""


class _Stop(Exception):
    """Internal: the track was stopped while the worker was busy."""


class DecoderPool:
    """The bound on concurrent decode threads; tracks beyond it queue in order."""

    def __init__(self, max_decoders: int = 64) -> None:
        self.max_decoders = max_decoders
        self._lock = threading.Lock()
        self._running: set["Track"] = set()
        self._waiting: collections.deque = collections.deque()

    def submit(self, track: "Track") -> None:
        with self._lock:
            if len(self._running) >= self.max_decoders:
                self._waiting.append(track)
                return
            self._running.add(track)
        self._start(track)

    def _start(self, track: "Track") -> None:
        thread = threading.Thread(target=self._run, args=(track,), name=f"telecom-decode-{track.id}",
                                  daemon=True)
        thread.start()

    def _run(self, track: "Track") -> None:
        try:
            run_track(track)
        finally:
            nxt = None
            with self._lock:
                self._running.discard(track)
                while self._waiting:
                    candidate = self._waiting.popleft()
                    if not candidate._stopping:
                        nxt = candidate
                        self._running.add(nxt)
                        break
            if nxt is not None:
                self._start(nxt)

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._running)


_pool = DecoderPool()


def get_pool() -> DecoderPool:
    return _pool


def configure(*, max_decoders: int | None = None) -> None:
    """Set the bound on concurrent decode threads (applies to tracks started afterwards)."""
    if max_decoders is not None:
        if max_decoders < 1:
            raise ConfigurationError("max_decoders must be >= 1")
        _pool.max_decoders = max_decoders


def as_source_error(exc: BaseException) -> SourceError:
    """Name the cause of a failure the way a user can act on it."""
    import av

    if isinstance(exc, SourceError):
        return exc
    if isinstance(exc, av.error.InvalidDataError):
        err: SourceError = DecodeError(f"unsupported or corrupt data: {exc}")
    elif isinstance(exc, av.error.FFmpegError):
        err = DecodeError(f"decoding failed: {exc}")
    elif isinstance(exc, OSError):
        err = SourceError(f"I/O error: {exc}")
    else:
        err = SourceError(f"{type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def _cause_of(exc: BaseException) -> BaseException:
    # PyAV re-raises an exception our file object raised inside read() as its own error, chained.
    seen = exc
    while seen is not None:
        if isinstance(seen, SourceError):
            return seen
        seen = seen.__cause__ or seen.__context__  # type: ignore[assignment]
    return exc


def run_track(track: "Track") -> None:
    """The body of one decode thread (never raises)."""
    import av

    container = None
    fileobj = None
    try:
        fileobj, target = track._open_input()
        track._check_stop()
        container = av.open(target, mode="r", metadata_errors="replace")
        streams = container.streams.audio
        if not streams:
            raise DecodeError(f"no audio stream in {track.name} ({container.format.name})")
        stream = streams[0]
        track._probed(container, stream, fileobj)
        _pump(track, container, stream)
        track._input_finished()
    except _Stop:
        pass
    except BaseException as exc:  # noqa: BLE001 - every failure becomes the track's error event
        cause = _cause_of(exc)
        if track._stopping:
            log.debug("track %s stopped with %r", track.id, cause)
        else:
            track._fail(as_source_error(cause))
    finally:
        if container is not None:
            try:
                container.close()
            except Exception:  # noqa: BLE001
                log.debug("closing the container failed", exc_info=True)
        if fileobj is not None:
            fileobj.close()
        track._worker_done()


def _pump(track: "Track", container: Any, stream: Any) -> None:
    from telecom.sources.convert import StereoResampler
    from telecom.sources.demux import opus_packet_ms

    demuxer: Any = container.demux(stream)
    opus_sink = None
    reframer = _Reframer(track)
    pipe_cls = track._opus_pipe_class(container, stream)
    if pipe_cls is not None:
        # Decide on the first packet: passthrough needs 20 ms packets.
        first = _next_packet(demuxer)
        if first is None:
            return
        ms = opus_packet_ms(bytes(first))
        if ms == 20.0 or _split_20ms(bytes(first)) is not None:
            opus_sink = track._start_passthrough(pipe_cls)
        else:
            track.passthrough_refusal = f"{ms:g} ms Opus packets"
            log.info("%s: %g ms Opus packets: decoding instead of passing through", track.name, ms)
        demuxer = itertools.chain([first], demuxer)
    resampler = None
    trim_until: float | None = None    # after a seek: drop decoded audio before this time (seconds)
    while True:
        seek = track._take_seek()
        if seek is not None and not track.seekable:
            # Asked before the probe showed a live stream / a server without ranges: nothing to do.
            log.warning("%s: seek to %.3f s ignored: the input cannot seek", track.name, seek)
            seek = None
        if seek is not None:
            _seek(container, stream, seek)
            resampler = None
            trim_until = seek
            track._flush(seek)
            reframer.reset()
            demuxer = container.demux(stream)
        packet = _next_packet(demuxer)
        if packet is None:
            break
        if opus_sink is not None:
            data = bytes(packet)
            ms = opus_packet_ms(data)
            when = _packet_time(packet)
            pieces = None if reframer.mid_frame else [data] if ms == 20.0 else _split_20ms(data)
            if trim_until is not None and when is not None:
                if when < trim_until - 0.010:
                    continue
                track._flush_to = when           # lands on the packet boundary nearest the target
            trim_until = None
            if pieces is None:
                pieces = reframer.feed(data, ms, when)
            else:
                for piece in pieces:
                    reframer.passed(piece)
            for piece in pieces:
                track._write_opus(opus_sink, piece)
            continue
        if resampler is None:
            resampler = StereoResampler()
        for frame in packet.decode():
            drop = 0
            if trim_until is not None and frame.time is not None:
                end = frame.time + frame.samples / frame.sample_rate
                if end <= trim_until:
                    continue
                drop = max(0, int(round((trim_until - frame.time) * 48000)))
            trim_until = None
            for data in resampler.resample(frame):
                if drop:
                    cut = min(drop, len(data) // 4)
                    data = data[cut * 4:]
                    drop -= cut
                if data:
                    track._write_pcm(data)
    if opus_sink is not None:
        for piece in reframer.flush():
            track._write_opus(opus_sink, piece)
        return
    # The end of input: flush the decoder and the resampler.
    if resampler is None:
        resampler = StereoResampler()
    for frame in stream.codec_context.decode(None):
        for data in resampler.resample(frame):
            track._write_pcm(data)
    for data in resampler.flush():
        track._write_pcm(data)


class _Reframer:
    """Keeps a passthrough stream going through packets that are not made of 20 ms frames.

    Encoders keep their frame size, but streams cut from calls or relays may switch it (10 ms, 2.5/5 ms,
    a 40/60 ms SILK frame). From such a packet on, the stream is decoded and re-encoded into 20 ms
    packets until the re-encoded audio ends on a 20 ms boundary and the next packet is 20 ms again;
    passthrough resumes with that packet. A stream that never realigns is re-encoded to its
    end, and its last partial frame is padded with silence.

    CELT predicts each frame's band energies from the previous frame's, so a decoder started cold in
    the middle of a stream plays the next ~100 ms up to 14 dB low (measured on a tone). Each section's
    decoder is therefore first fed the last ``HISTORY`` packets that went out as they were (200 ms:
    then its output matches a decoder that saw the whole stream). The encoder is reset at each
    section, so its first packet codes its energies without prediction, whatever the receivers'
    decoders last heard; it runs at the bitrate of the packets that went out before the section.
    """

    HISTORY = 10

    def __init__(self, track: "Track") -> None:
        self._track = track
        self._dec: Any = None
        self._enc: Any = None
        self._pcm = bytearray()
        self._recent: collections.deque[bytes] = collections.deque(maxlen=self.HISTORY)
        self.active = False
        self.sections = 0

    def reset(self) -> None:
        self._pcm.clear()
        self._recent.clear()
        self.active = False

    def passed(self, packet: bytes) -> None:
        """A 20 ms packet that went out as it was: a section (if any) has ended; kept to warm the next
        section's decoder."""
        self.active = False
        self._recent.append(packet)

    def feed(self, packet: bytes, ms: float, when: float | None) -> list[bytes]:
        from telecom.errors import CodecError
        from telecom.opus import FRAME_BYTES, Decoder, Encoder

        if not self.active:
            self.sections += 1
            # Once per track at info level: a stream that switches often would flood the log.
            log.log(logging.INFO if self.sections == 1 else logging.DEBUG,
                    "%s: a %g ms Opus packet at %s s: re-encoding into 20 ms frames until they realign "
                    "(stretch %d)", self._track.name, ms, when, self.sections)
            self._dec = Decoder()
            # The bitrate of the packets that went out as they were (not of this one: the packet at a
            # switch can be a few bytes, and 24 kbit/s would move the encoder to SILK).
            size = sum(map(len, self._recent)) / len(self._recent) if self._recent else 160
            bitrate = max(32000, min(256000, round(size * 8 * 50 / 8000) * 8000))
            for earlier in self._recent:
                try:
                    self._dec.decode(earlier)
                except CodecError:
                    pass                     # it went out as it was; only the warm-up loses it
            self._recent.clear()
            if self._enc is None:
                self._enc = Encoder(bitrate=bitrate)
            else:
                self._enc.reset()
                self._enc.bitrate = bitrate
            self.active = True
        try:
            self._pcm += self._dec.decode(packet)
        except CodecError as exc:
            raise DecodeError(f"a corrupt Opus packet at {when} s: {exc}") from None
        out = []
        while len(self._pcm) >= FRAME_BYTES:
            out.append(self._enc.encode(bytes(self._pcm[:FRAME_BYTES])))
            del self._pcm[:FRAME_BYTES]
        self._track.reencoded_frames += len(out)
        return out

    @property
    def mid_frame(self) -> bool:
        """Re-encoded audio is waiting for the rest of a 20 ms frame: the next packet must be decoded."""
        return bool(self._pcm)

    def flush(self) -> list[bytes]:
        """The stream ended inside a re-encoded section: its last partial frame, padded with silence."""
        from telecom.opus import FRAME_BYTES

        if not self._pcm:
            return []
        frame = bytes(self._pcm) + bytes(FRAME_BYTES - len(self._pcm))
        self.reset()
        self._track.reencoded_frames += 1
        return [self._enc.encode(frame)]


def _split_20ms(data: bytes) -> list[bytes] | None:
    """:func:`~telecom.sources.demux.split_to_20ms`, with a malformed packet counted as unsplittable
    (it is then decoded: by the decode path, or by :class:`_Reframer` in a passthrough stream, where a
    packet that does not decode ends the track with a DecodeError naming it)."""
    from telecom.sources.demux import split_to_20ms

    try:
        return split_to_20ms(data)
    except ValueError:
        return None


def _packet_time(packet: Any) -> float | None:
    if packet.pts is None or packet.time_base is None:
        return None
    return float(packet.pts * packet.time_base)


def _next_packet(demuxer: Any) -> Any:
    for packet in demuxer:
        if packet.size == 0 and packet.dts is None:
            continue               # the demuxer's end-of-stream marker, not data
        return packet
    return None


def _seek(container: Any, stream: Any, seconds: float) -> None:
    import av

    if stream.time_base is None:
        raise DecodeError("this stream has no time base to seek in")
    ts = int(seconds / stream.time_base) + (stream.start_time or 0)
    try:
        container.seek(ts, stream=stream, backward=True, any_frame=False)
    except av.error.FFmpegError as exc:
        raise DecodeError(f"seek to {seconds:.3f} s failed: {exc}") from exc
    stream.codec_context.flush_buffers()


__all__ = ["DecodeError", "DecoderPool", "configure", "get_pool", "run_track"]
