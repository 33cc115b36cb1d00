"""Pure-Python twin of :mod:`telecom._fast.mixer`: the readable reference and the test oracle.

Same API, bit-identical results (``TELECOM_NO_EXTENSIONS=1`` selects it). Plain ints and the
``array`` module only, no numpy, so telecom keeps working without a compiler. The arithmetic follows
the rules written at the top of ``telecom/_fast/mixer.pyx``: gains pass through a C ``float`` (emulated
with ``struct``), ramps are computed in double precision as ``g_from + ((g_to - g_from) / frames) * k``
per sample-frame ``k``, products round half to even (Python's ``round``) and results saturate to int16.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence

from telecom.errors import ConfigurationError

SAMPLE_RATE = 48000
CHANNELS = 2
RAMP_FRAMES = 240  # 5 ms at 48 kHz; see GainRamp
_FRAME_BYTES = CHANNELS * 2
_BIG_ENDIAN = sys.byteorder == "big"
_F32 = struct.Struct("f")


def _as_c_float(x: float) -> float:
    """``x`` rounded to a C float and widened back, as the C functions' ``float`` parameters do."""
    return _F32.unpack(_F32.pack(x))[0]


def _samples(pcm, what: str) -> array:
    data = memoryview(pcm).cast("B")
    if len(data) % _FRAME_BYTES:
        raise ValueError(
            f"{what}: PCM must be whole s16le stereo sample-frames "
            f"(a multiple of {_FRAME_BYTES} bytes), got {len(data)} bytes"
        )
    a = array("h", data.tobytes())
    if _BIG_ENDIAN:
        a.byteswap()
    return a


def _to_bytes(a: array) -> bytes:
    if _BIG_ENDIAN:
        a = array("h", a)
        a.byteswap()
    return a.tobytes()


def _saturate(v: int) -> int:
    return 32767 if v > 32767 else -32768 if v < -32768 else v


def _gains(frames: int, gain_from: float, gain_to: float):
    """The per-sample-frame gains of a (possibly constant) ramp, exactly as the C loops compute them."""
    g0 = _as_c_float(gain_from)
    g1 = _as_c_float(gain_to)
    if g0 == g1:
        return [g0] * frames
    step = (g1 - g0) / frames
    return [g0 + step * k for k in range(frames)]


# ---- twins of the C-level functions (list/array based) -----------------------------------------


def mix_accumulate(acc: list[int], src: Sequence[int], frames: int, channels: int,
                   gain_from: float, gain_to: float) -> None:
    """acc[i] += round(src[i] * g) with g ramped per sample-frame (see the module docstring)."""
    if frames <= 0:
        return
    for k, g in enumerate(_gains(frames, gain_from, gain_to)):
        base = k * channels
        for i in range(base, base + channels):
            acc[i] += round(src[i] * g)


def mix_saturate(acc: Sequence[int]) -> array:
    return array("h", [_saturate(v) for v in acc])


def scale_into(buf: array, frames: int, channels: int, gain_from: float, gain_to: float) -> None:
    """In place: buf[i] = saturate(round(buf[i] * g)), g ramped per sample-frame."""
    if frames <= 0:
        return
    for k, g in enumerate(_gains(frames, gain_from, gain_to)):
        base = k * channels
        for i in range(base, base + channels):
            buf[i] = _saturate(round(buf[i] * g))


# ---- Python API ---------------------------------------------------------------------------------


def gain_for_percent(percent: float) -> float:
    """Linear gain for a volume in percent (100 -> 1.0); 0-200 is valid, else ConfigurationError."""
    percent = float(percent)
    if not (0.0 <= percent <= 200.0):  # also rejects NaN
        raise ConfigurationError(f"volume must be 0-200 %, not {percent!r}")
    return percent / 100.0


def apply_volume(pcm, percent: float) -> bytes:
    """``pcm`` (s16le stereo) scaled to ``percent`` (0-200), rounded and saturated."""
    g = gain_for_percent(percent)
    buf = _samples(pcm, "apply_volume")
    scale_into(buf, len(buf) // CHANNELS, CHANNELS, g, g)
    return _to_bytes(buf)


def mix(frames, percents=None) -> bytes:
    """Sum s16le stereo buffers, each scaled by its volume in percent, saturated to int16.

    Buffers of unequal length count as silence after their end; the result has the longest length.
    """
    sources = list(frames)
    if percents is None:
        gains = [1.0] * len(sources)
    else:
        gains = [gain_for_percent(p) for p in percents]
        if len(gains) != len(sources):
            raise ValueError(f"mix: {len(sources)} frames but {len(gains)} volumes")
    arrays = [_samples(s, "mix") for s in sources]
    acc = [0] * max((len(a) for a in arrays), default=0)
    for a, g in zip(arrays, gains):
        mix_accumulate(acc, a, len(a) // CHANNELS, CHANNELS, g, g)
    return _to_bytes(mix_saturate(acc))


class GainRamp:
    """A volume that glides to a new value over RAMP_FRAMES (240 sample-frames = 5 ms at 48 kHz).

    See :class:`telecom._fast.mixer.GainRamp`; this is its line-by-line twin.
    """

    def __init__(self, percent: float = 100.0) -> None:
        self._gain = self._target = gain_for_percent(percent)
        self._remaining = 0

    @property
    def gain(self) -> float:
        return self._gain

    @property
    def target_gain(self) -> float:
        return self._target

    @property
    def ramping(self) -> bool:
        return self._remaining > 0

    def set_target(self, percent: float) -> None:
        g = gain_for_percent(percent)
        self._target = g
        self._remaining = RAMP_FRAMES if g != self._gain else 0

    def process(self, pcm) -> bytes:
        buf = _samples(pcm, "GainRamp.process")
        frames = len(buf) // CHANNELS
        done = 0
        if self._remaining > 0 and frames > 0:
            done = min(self._remaining, frames)
            if done == self._remaining:
                nxt = self._target
            else:
                nxt = self._gain + (self._target - self._gain) * done / self._remaining
            head = buf[: done * CHANNELS]
            scale_into(head, done, CHANNELS, self._gain, nxt)
            buf[: done * CHANNELS] = head
            self._gain = nxt
            self._remaining -= done
        if done < frames:
            tail = buf[done * CHANNELS:]
            scale_into(tail, frames - done, CHANNELS, self._gain, self._gain)
            buf[done * CHANNELS:] = tail
        return _to_bytes(buf)

    def __repr__(self) -> str:
        return f"<GainRamp gain={self._gain:.4f} target={self._target:.4f} ramping={self._remaining > 0}>"
