"""PCM format conversion for pipes: any rate, mono or stereo, s16 or f32 in; 48 kHz s16 stereo out.

What it owns: :class:`PcmConverter` (a stateful PyAV ``AudioResampler`` fed whole samples, so a send
boundary inside a sample is carried over) and :class:`ConvertingPcmPipe`, the :class:`~telecom.PcmPipe`
that ``Playable.from_pcm_pipe(sample_rate=..., channels=..., sample_format=...)`` returns for anything
but the native format. ``send`` keeps the pipe's all-or-nothing rule: room for the converted size is
checked before the resampler sees the data, so a :class:`~telecom.BufferFull` consumes nothing.

What it must not do: run per frame on a media thread; conversion happens in the caller's ``send``.
"""

from __future__ import annotations

import threading

import numpy as np

from telecom.errors import BufferFull, ConfigurationError
from telecom.playable import PcmPipe

FORMATS = {"s16": ("<i2", "s16", 2), "f32": ("<f4", "flt", 4)}


class StereoResampler:
    """PyAV frames of any rate/format/layout -> 48 kHz s16le stereo bytes.

    Mono is resampled as mono and then copied to both channels: libswresample's own mono -> stereo
    upmix puts the channel at -3 dB on each side, and a voice bot's mono file should sound as loud as
    the same file in stereo. More than two channels are downmixed by libswresample.
    """

    def __init__(self) -> None:
        self._resampler = None
        self._mono = False

    def resample(self, frame):  # -> list[bytes]
        import av

        if self._resampler is None:
            if frame is None:
                return []
            self._mono = len(frame.layout.channels) == 1
            self._resampler = av.AudioResampler(format="s16", layout="mono" if self._mono else "stereo",
                                                rate=48000)
        return [self._bytes(out) for out in self._resampler.resample(frame)]

    def flush(self):  # -> list[bytes]
        return self.resample(None) if self._resampler is not None else []

    def _bytes(self, out) -> bytes:
        if self._mono:
            mono = np.frombuffer(bytes(out.planes[0])[: out.samples * 2], dtype="<i2")
            return np.repeat(mono, 2).tobytes()
        return bytes(out.planes[0])[: out.samples * 4]


class PcmConverter:
    """Convert interleaved PCM of ``sample_rate``/``channels``/``sample_format`` to 48 kHz s16 stereo."""

    def __init__(self, sample_rate: int, channels: int, sample_format: str) -> None:
        if not isinstance(sample_rate, int) or not 8000 <= sample_rate <= 192000:
            raise ConfigurationError(f"sample_rate must be an int in 8000..192000, not {sample_rate!r}")
        if channels not in (1, 2):
            raise ConfigurationError(f"channels must be 1 or 2, not {channels!r}")
        if sample_format not in FORMATS:
            raise ConfigurationError(f"sample_format must be one of {sorted(FORMATS)}, not {sample_format!r}")
        import av

        self.sample_rate = sample_rate
        self.channels = channels
        self.sample_format = sample_format
        self._dtype, self._av_format, width = FORMATS[sample_format]
        self.bytes_per_sample = width * channels
        self._layout = "mono" if channels == 1 else "stereo"
        self._resampler = StereoResampler()
        self._carry = b""
        self._lock = threading.Lock()

    def max_output_bytes(self, nbytes: int) -> int:
        """An upper bound of the output size for ``nbytes`` more input (the resampler may hold some back)."""
        samples = (len(self._carry) + nbytes) // self.bytes_per_sample
        return (samples * 48000 // self.sample_rate + 64) * 4

    def convert(self, data: bytes | bytearray | memoryview, flush: bool = False) -> bytes:
        import av

        with self._lock:
            raw = self._carry + bytes(data)
            whole = len(raw) - len(raw) % self.bytes_per_sample
            self._carry = raw[whole:]
            out = []
            if whole:
                samples = np.frombuffer(raw[:whole], dtype=self._dtype).reshape(1, -1)
                frame = av.AudioFrame.from_ndarray(samples, format=self._av_format, layout=self._layout)
                frame.sample_rate = self.sample_rate
                out.extend(self._resampler.resample(frame))
            if flush:
                out.extend(self._resampler.flush())
            return b"".join(out)


class ConvertingPcmPipe(PcmPipe):
    """A :class:`~telecom.PcmPipe` that takes another PCM format and converts it on ``send``."""

    def __init__(self, *, buffer_seconds: float = 10.0, sample_rate: int, channels: int,
                 sample_format: str) -> None:
        self.converter = PcmConverter(sample_rate, channels, sample_format)
        super().__init__(buffer_seconds=buffer_seconds)

    def send(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        need = self.converter.max_output_bytes(view.nbytes)
        if need > self.capacity:
            raise ConfigurationError(f"{view.nbytes} bytes convert to more than this {self.capacity}-byte "
                                     "pipe holds; send smaller pieces")
        if self.capacity - self.buffered < need:
            raise BufferFull(f"the pipe holds {self.buffered} of {self.capacity} bytes; "
                             f"{view.nbytes} input bytes (up to {need} converted) do not fit")
        converted = self.converter.convert(view)
        if converted:
            super().send(converted)

    def wait_writable(self, nbytes: int, timeout: float | None = None) -> None:
        super().wait_writable(self.converter.max_output_bytes(nbytes), timeout)

    def close(self) -> None:
        tail = self.converter.convert(b"", flush=True)
        if tail:
            try:
                super().send(tail)
            except BufferFull:
                self._source.write(memoryview(tail), True)   # the few resampler-held samples
        super().close()
