# cython: language_level=3
"""int16 mixing and volume: the per-frame sample arithmetic of the media engine.

This module owns the sample math only (sum, gain, ramp, saturate); it knows nothing about sources,
timing or codecs. The C functions declared in ``mixer.pxd`` are what the engine calls without the
GIL; the Python functions below wrap them for callers and tests and must stay bit-identical to the
pure-Python twin :mod:`telecom._twin.mixer` (the test oracle).

Rules shared with the twin (change both or neither):

* a gain ramp from ``gain_from`` to ``gain_to`` over ``frames`` sample-frames uses, for sample-frame
  ``k``, ``g = gain_from + ((gain_to - gain_from) / frames) * k`` in double precision, the float gains
  widened from C ``float`` (so the ramp starts exactly at ``gain_from`` and the next block starts at
  ``gain_to``);
* ``round()`` is round-half-to-even, done with the 1.5 * 2**52 trick: adding and subtracting it makes
  the FPU round to an integer in the current (nearest-even) mode, without a libm call and in a form
  gcc can vectorise;
* results saturate to [-32768, 32767].
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport int16_t, int32_t
from libc.string cimport memcpy, memset

from telecom.errors import ConfigurationError

SAMPLE_RATE = 48000
CHANNELS = 2
# Length of a GainRamp transition: 5 ms at 48 kHz. Long enough that a 0 -> 200 % change moves a
# full-scale sample by at most 2 * 32767 / 240 ~ 273 per step (no click), short enough to feel instant.
RAMP_FRAMES = 240

cdef enum:
    # Constant-gain loops run in fixed blocks of _BLOCK samples: gcc 12 at -O2 (the project's flag,
    # see setup.py) only vectorises loops whose trip count is known, so the inner block loop becomes
    # SIMD code and a short scalar tail handles the rest.
    _BLOCK = 16
    _STEREO = 2
    _FRAME_BYTES = 4    # bytes per s16le stereo sample-frame


cdef inline double _round_even(double x) noexcept nogil:
    # Exact for |x| < 2**51: the sum lands where the spacing of doubles is 1, so the addition itself
    # rounds (ties to even); the subtraction is exact. Needs SSE2 doubles (no x87 excess precision).
    return (x + 6755399441055744.0) - 6755399441055744.0


cdef inline int16_t _saturate(double x) noexcept nogil:
    # branch-free form (min/max) so the block loops vectorise
    x = 32767.0 if x > 32767.0 else x
    x = -32768.0 if x < -32768.0 else x
    return <int16_t>x


cdef void mix_clear(int32_t* acc, Py_ssize_t n) noexcept nogil:
    if n > 0:
        memset(acc, 0, <size_t>n * sizeof(int32_t))


@cython.cdivision(True)
cdef void mix_accumulate(int32_t* acc, const int16_t* src, Py_ssize_t frames, int channels,
                         float gain_from, float gain_to) noexcept nogil:
    cdef Py_ssize_t i, j, k, b
    cdef Py_ssize_t n = frames * channels
    cdef int c
    cdef double g
    cdef double step
    if frames <= 0:
        return
    if gain_from == gain_to:
        if gain_from == 1.0:
            for b in range(n // _BLOCK):
                i = b * _BLOCK
                for j in range(_BLOCK):
                    acc[i + j] += src[i + j]
            for i in range(n - n % _BLOCK, n):
                acc[i] += src[i]
        elif gain_from != 0.0:   # round(s * 0) == 0: nothing to add
            g = gain_from
            for b in range(n // _BLOCK):
                i = b * _BLOCK
                for j in range(_BLOCK):
                    acc[i + j] += <int32_t>_round_even(src[i + j] * g)
            for i in range(n - n % _BLOCK, n):
                acc[i] += <int32_t>_round_even(src[i] * g)
        return
    step = (<double>gain_to - <double>gain_from) / <double>frames
    for k in range(frames):
        g = gain_from + step * <double>k
        for c in range(channels):
            i = k * channels + c
            acc[i] += <int32_t>_round_even(src[i] * g)


cdef void mix_saturate(int16_t* out, const int32_t* acc, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i, j, b
    cdef int32_t v
    for b in range(n // _BLOCK):
        i = b * _BLOCK
        for j in range(_BLOCK):
            v = acc[i + j]
            v = 32767 if v > 32767 else v
            v = -32768 if v < -32768 else v
            out[i + j] = <int16_t>v
    for i in range(n - n % _BLOCK, n):
        v = acc[i]
        v = 32767 if v > 32767 else v
        v = -32768 if v < -32768 else v
        out[i] = <int16_t>v


@cython.cdivision(True)
cdef void scale_into(int16_t* buf, Py_ssize_t frames, int channels, float gain_from,
                     float gain_to) noexcept nogil:
    cdef Py_ssize_t i, j, k, b
    cdef Py_ssize_t n = frames * channels
    cdef int c
    cdef double g
    cdef double step
    if frames <= 0:
        return
    if gain_from == gain_to:
        if gain_from == 1.0:
            return
        g = gain_from
        # saturate before the integer conversion: round(clamp(x)) == clamp(round(x)) for integer
        # bounds, and the conversion stays defined for any finite gain
        for b in range(n // _BLOCK):
            i = b * _BLOCK
            for j in range(_BLOCK):
                buf[i + j] = _saturate(_round_even(buf[i + j] * g))
        for i in range(n - n % _BLOCK, n):
            buf[i] = _saturate(_round_even(buf[i] * g))
        return
    step = (<double>gain_to - <double>gain_from) / <double>frames
    for k in range(frames):
        g = gain_from + step * <double>k
        for c in range(channels):
            i = k * channels + c
            buf[i] = _saturate(_round_even(buf[i] * g))


# ---- Python API ---------------------------------------------------------------------------------

cpdef double gain_for_percent(double percent) except? -1.0:
    """Linear gain for a volume in percent (100 -> 1.0); 0-200 is valid, else ConfigurationError."""
    if not (0.0 <= percent <= 200.0):   # also rejects NaN
        raise ConfigurationError(f"volume must be 0-200 %, not {percent!r}")
    return percent / 100.0


cdef object _copy_frames(object pcm, str what):
    """A fresh bytes copy of ``pcm`` (any contiguous buffer) holding whole stereo sample-frames."""
    cdef Py_buffer view
    PyObject_GetBuffer(pcm, &view, PyBUF_SIMPLE)
    try:
        if view.len % _FRAME_BYTES:
            raise ValueError(f"{what}: PCM must be whole s16le stereo sample-frames "
                             f"(a multiple of {_FRAME_BYTES} bytes), got {view.len} bytes")
        return PyBytes_FromStringAndSize(<char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


def apply_volume(pcm, double percent) -> bytes:
    """``pcm`` (s16le stereo) scaled to ``percent`` (0-200), rounded and saturated.

    >>> apply_volume(b"\\x10\\x00\\x10\\x00", 50)
    b'\\x08\\x00\\x08\\x00'
    """
    cdef float g = gain_for_percent(percent)
    out = _copy_frames(pcm, "apply_volume")
    cdef Py_ssize_t frames = len(out) // _FRAME_BYTES
    scale_into(<int16_t*>PyBytes_AS_STRING(out), frames, _STEREO, g, g)
    return out


def mix(frames, percents=None) -> bytes:
    """Sum s16le stereo buffers, each scaled by its volume in percent, saturated to int16.

    Buffers of unequal length count as silence after their end; the result has the longest length.

    >>> mix([b"\\x00\\x40\\x00\\x40", b"\\x00\\x40\\x00\\x40"])   # 16384 + 16384 saturates
    b'\\xff\\x7f\\xff\\x7f'
    """
    cdef list sources = list(frames)
    cdef Py_ssize_t count = len(sources)
    cdef list gains
    if percents is None:
        gains = [1.0] * count
    else:
        gains = [gain_for_percent(p) for p in percents]
        if len(gains) != count:
            raise ValueError(f"mix: {count} frames but {len(gains)} volumes")
    # bytes copies are aligned for int16 reads whatever buffer the caller passed
    cdef list copies = [_copy_frames(s, "mix") for s in sources]
    cdef Py_ssize_t longest = 0
    for s in copies:
        if len(s) > longest:
            longest = len(s)
    cdef Py_ssize_t n = longest // 2
    cdef int32_t* acc = <int32_t*>PyMem_Malloc(max(n, 1) * sizeof(int32_t))
    if acc == NULL:
        raise MemoryError()
    cdef float g
    cdef Py_ssize_t i
    try:
        mix_clear(acc, n)
        for i in range(count):
            g = gains[i]
            s = copies[i]
            mix_accumulate(acc, <const int16_t*>PyBytes_AS_STRING(s), len(s) // _FRAME_BYTES,
                           _STEREO, g, g)
        out = PyBytes_FromStringAndSize(NULL, n * 2)
        mix_saturate(<int16_t*>PyBytes_AS_STRING(out), acc, n)
    finally:
        PyMem_Free(acc)
    return out


cdef class GainRamp:
    """A volume that glides to a new value over RAMP_FRAMES (240 sample-frames = 5 ms at 48 kHz).

    ``process()`` applies the current gain to consecutive s16le stereo buffers; after ``set_target()``
    the gain moves linearly (per sample-frame) to the target across 240 sample-frames, whatever the
    buffer sizes, then stays constant. A new target during a ramp starts a fresh 240-frame ramp from
    the gain reached so far, so there is never a step.

    >>> ramp = GainRamp(100)
    >>> ramp.set_target(50)
    >>> out = ramp.process(pcm_20ms)   # first 5 ms fade from 100 % to 50 %, the rest at 50 %
    """

    cdef double _gain
    cdef double _target
    cdef Py_ssize_t _remaining

    def __init__(self, double percent=100.0):
        self._gain = self._target = gain_for_percent(percent)
        self._remaining = 0

    @property
    def gain(self) -> float:
        """The gain applied to the next sample-frame."""
        return self._gain

    @property
    def target_gain(self) -> float:
        return self._target

    @property
    def ramping(self) -> bool:
        return self._remaining > 0

    def set_target(self, double percent) -> None:
        """Start moving to ``percent`` (0-200); ConfigurationError outside that range."""
        cdef double g = gain_for_percent(percent)
        self._target = g
        self._remaining = RAMP_FRAMES if g != self._gain else 0

    def process(self, pcm) -> bytes:
        """Return ``pcm`` (s16le stereo) with the (ramping) gain applied, saturated."""
        out = _copy_frames(pcm, "GainRamp.process")
        cdef int16_t* buf = <int16_t*>PyBytes_AS_STRING(out)
        cdef Py_ssize_t frames = len(out) // _FRAME_BYTES
        cdef Py_ssize_t done = 0
        cdef double nxt
        if self._remaining > 0 and frames > 0:
            done = min(self._remaining, frames)
            if done == self._remaining:
                nxt = self._target
            else:
                nxt = self._gain + (self._target - self._gain) * done / self._remaining
            scale_into(buf, done, _STEREO, <float>self._gain, <float>nxt)
            self._gain = nxt
            self._remaining -= done
        if done < frames:
            scale_into(buf + done * _STEREO, frames - done, _STEREO, <float>self._gain, <float>self._gain)
        return out

    def __repr__(self):
        return f"<GainRamp gain={self._gain:.4f} target={self._target:.4f} ramping={self._remaining > 0}>"
