# C-level contract of telecom._fast.opus: the Encoder/Decoder extension types and their libopus
# pointers, so other Cython code (the media engine) can reach the codec state without Python calls.
#
# encode_raw/decode_raw are the nogil paths: they take raw buffers, return libopus' status/length
# (negative = OPUS_* error), never raise and never touch Python objects. The caller must make sure one
# thread at a time uses an Encoder/Decoder (libopus states are not thread-safe).

from telecom._fast.includes.opus cimport OpusDecoder, OpusEncoder, opus_int16, opus_int32

cdef enum:
    # libopus' recommended output buffer size for one packet (opus_encode docs: "4000 bytes").
    OPUS_MAX_PACKET_BYTES = 4000
    # 120 ms at 48 kHz: the longest packet Opus can carry, per channel.
    OPUS_MAX_FRAME_SAMPLES = 5760

cdef class Encoder:
    cdef OpusEncoder* _enc
    cdef readonly int channels
    cdef readonly int sample_rate
    cdef readonly int frame_samples       # per channel, 20 ms at sample_rate
    cdef readonly Py_ssize_t frame_bytes  # s16le interleaved bytes of one frame
    cdef readonly int lookahead           # codec delay, samples per channel
    cdef int _application
    cdef int _bitrate
    cdef int _complexity
    cdef int _expected_loss
    cdef bint _fec
    cdef bint _busy

    # One 20 ms frame (frame_samples per channel, interleaved) -> packet bytes written, or < 0 (OPUS_*).
    cdef opus_int32 encode_raw(self, const opus_int16* pcm, unsigned char* out,
                               opus_int32 max_bytes) noexcept nogil
    cdef int _apply_fec(self) except -1
    cdef int _enter(self) except -1

cdef class Decoder:
    cdef OpusDecoder* _dec
    cdef readonly int channels
    cdef readonly int sample_rate
    cdef readonly int frame_samples       # per channel, 20 ms at sample_rate
    cdef bint _busy

    # data == NULL / n == 0: concealment of frame_size samples. Returns samples per channel or < 0.
    cdef int decode_raw(self, const unsigned char* data, opus_int32 n, opus_int16* pcm,
                        int frame_size, bint fec) noexcept nogil
    cdef int _enter(self) except -1
