# C-level contract of telecom._fast.mixer: int16 mixing primitives for the media engine.
#
# Buffers are interleaved native-endian int16 (s16le on every supported host); `n` counts samples,
# `frames` counts sample-frames (one sample per channel). All functions are pure C over raw pointers:
# no Python objects, no errors, safe without the GIL.
#
# Rounding: every product is rounded to the nearest integer, ties to even (what Python's round() does),
# computed in double precision from the float gains, so the pure-Python twin telecom._twin.mixer gives
# bit-identical results. Gains are meant to be 0..2 (0-200 %); |gain| <= 4 and at most 8192 sources per
# accumulator keep every sum inside int32.

from libc.stdint cimport int16_t, int32_t

cdef void mix_clear(int32_t* acc, Py_ssize_t n) noexcept nogil
cdef void mix_accumulate(int32_t* acc, const int16_t* src, Py_ssize_t frames, int channels,
                         float gain_from, float gain_to) noexcept nogil
    # acc[i] += round(src[i] * g), g linearly ramped per sample-frame from gain_from to gain_to over
    # `frames` sample-frames (gain_from == gain_to: constant; fast path when both are 1.0)
cdef void mix_saturate(int16_t* out, const int32_t* acc, Py_ssize_t n) noexcept nogil
cdef void scale_into(int16_t* buf, Py_ssize_t frames, int channels, float gain_from, float gain_to) noexcept nogil
    # in place, saturating
