# cython: language_level=3
"""Opus encoder and decoder over libopus (48 kHz stereo, 20 ms frames of s16le PCM).

This module owns the libopus states and the conversion of libopus' status codes into
:class:`telecom.errors.CodecError`. It does not pace, packetize or encrypt anything: the media engine
does that, reaching ``Encoder._enc``/``Decoder._dec`` through ``opus.pxd``. The GIL is released exactly
around ``opus_encode``/``opus_decode``; a per-object busy flag turns accidental concurrent use from two
Python threads into a ``RuntimeError`` instead of a corrupted codec state.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.string cimport memcpy

from telecom._fast.includes.opus cimport (
    OPUS_APPLICATION_AUDIO,
    OPUS_APPLICATION_RESTRICTED_LOWDELAY,
    OPUS_APPLICATION_VOIP,
    OPUS_INVALID_PACKET,
    OPUS_OK,
    opus_decode,
    opus_decoder_create,
    opus_decoder_destroy,
    opus_decoder_get_nb_samples,
    opus_encode,
    opus_encoder_create,
    opus_encoder_destroy,
    opus_get_version_string,
    opus_packet_get_nb_samples,
    opus_strerror,
    tc_opus_decoder_reset,
    tc_opus_encoder_reset,
    tc_opus_get_lookahead,
    tc_opus_set_bitrate,
    tc_opus_set_complexity,
    tc_opus_set_inband_fec,
    tc_opus_set_packet_loss_perc,
)

from telecom.errors import CodecError, ConfigurationError

SAMPLE_RATE = 48000
CHANNELS = 2
FRAME_SAMPLES = 960                       # per channel: 20 ms at 48 kHz (spec §2.3)
FRAME_BYTES = FRAME_SAMPLES * CHANNELS * 2
SILENCE_FRAME = b"\xf8\xff\xfe"           # spec §2.5
MAX_PACKET_BYTES = OPUS_MAX_PACKET_BYTES
LIBOPUS_VERSION = opus_get_version_string().decode("ascii", "replace")

# libopus 1.3 only writes in-band FEC data when it is told to expect loss; discord.py uses 15 %.
DEFAULT_FEC_LOSS = 15

_APPLICATIONS = {
    "audio": OPUS_APPLICATION_AUDIO,
    "voip": OPUS_APPLICATION_VOIP,
    "lowdelay": OPUS_APPLICATION_RESTRICTED_LOWDELAY,
}
_APPLICATION_NAMES = {v: k for k, v in _APPLICATIONS.items()}
_SAMPLE_RATES = (8000, 12000, 16000, 24000, 48000)


cdef object _codec_error(int code, str what):
    return CodecError(f"{what}: {opus_strerror(code).decode('ascii', 'replace')}", code)


cdef int _check(int status, str what) except -1:
    if status < 0:
        raise _codec_error(status, what)
    return 0


cdef int _check_layout(int channels, int sample_rate) except -1:
    if channels not in (1, 2):
        raise ConfigurationError(f"channels must be 1 or 2, not {channels!r}")
    if sample_rate not in _SAMPLE_RATES:
        raise ConfigurationError(f"sample_rate must be one of {_SAMPLE_RATES}, not {sample_rate!r}")
    return 0


cdef class Encoder:
    """Opus encoder for 20 ms frames of interleaved s16le PCM.

    ``fec=True`` turns on in-band forward error correction; libopus then needs an expected loss
    percentage (``expected_loss``, 15 when left at 0) and costs 3.5-6x more CPU per frame
    (PERFORMANCE.md), which is why it is off by default.

    >>> enc = Encoder(bitrate=64000)
    >>> packet = enc.encode(bytes(FRAME_BYTES))   # 20 ms of digital silence
    """

    def __cinit__(self):
        self._enc = NULL
        self._busy = False

    def __init__(self, *, int bitrate=64000, int complexity=10, bint fec=False, int expected_loss=0,
                 str application="audio", int channels=2, int sample_rate=48000):
        cdef int err = OPUS_OK
        _check_layout(channels, sample_rate)
        if application not in _APPLICATIONS:
            raise ConfigurationError(f"application must be one of {tuple(_APPLICATIONS)}, not {application!r}")
        _check_bitrate(bitrate)
        _check_complexity(complexity)
        _check_loss(expected_loss)
        if self._enc != NULL:  # __init__ called again: start from a fresh state
            opus_encoder_destroy(self._enc)
            self._enc = NULL
        self.channels = channels
        self.sample_rate = sample_rate
        self.frame_samples = sample_rate // 50
        self.frame_bytes = self.frame_samples * channels * 2
        self._application = _APPLICATIONS[application]
        self._enc = opus_encoder_create(sample_rate, channels, self._application, &err)
        if self._enc == NULL or err != OPUS_OK:
            self._enc = NULL
            raise _codec_error(err, "opus_encoder_create")
        self._bitrate = bitrate
        self._complexity = complexity
        self._expected_loss = expected_loss
        self._fec = fec
        _check(tc_opus_set_bitrate(self._enc, bitrate), "set bitrate")
        _check(tc_opus_set_complexity(self._enc, complexity), "set complexity")
        self._apply_fec()
        cdef opus_int32 look = 0
        _check(tc_opus_get_lookahead(self._enc, &look), "get lookahead")
        self.lookahead = look

    def __dealloc__(self):
        if self._enc != NULL:
            opus_encoder_destroy(self._enc)
            self._enc = NULL

    cdef opus_int32 encode_raw(self, const opus_int16* pcm, unsigned char* out,
                               opus_int32 max_bytes) noexcept nogil:
        return opus_encode(self._enc, pcm, self.frame_samples, out, max_bytes)

    cdef int _apply_fec(self) except -1:
        cdef int loss = 0
        if self._fec:
            if self._expected_loss == 0:
                self._expected_loss = DEFAULT_FEC_LOSS
            loss = self._expected_loss
        _check(tc_opus_set_inband_fec(self._enc, 1 if self._fec else 0), "set inband FEC")
        _check(tc_opus_set_packet_loss_perc(self._enc, loss), "set packet loss percentage")
        return 0

    cdef int _enter(self) except -1:
        if self._enc == NULL:
            raise RuntimeError("Encoder was not initialised")
        if self._busy:
            raise RuntimeError("this Encoder is being used by another thread")
        self._busy = True
        return 0

    def encode(self, pcm):
        """Encode exactly one 20 ms frame (``frame_bytes`` of s16le interleaved PCM) into an Opus packet.

        Accepts any contiguous buffer (bytes, bytearray, memoryview, array('h')). A wrong size raises
        ``ValueError``; a libopus failure raises ``CodecError``.
        """
        cdef Py_buffer view
        cdef unsigned char out[OPUS_MAX_PACKET_BYTES]
        cdef opus_int32 n
        cdef opus_int16* aligned = NULL
        cdef const opus_int16* samples
        PyObject_GetBuffer(pcm, &view, PyBUF_SIMPLE)
        try:
            if view.len != self.frame_bytes:
                raise ValueError(
                    f"Encoder.encode needs exactly one 20 ms frame: {self.frame_bytes} bytes of s16le "
                    f"PCM ({self.frame_samples} samples x {self.channels} channels), got {view.len}"
                )
            self._enter()
            try:
                samples = <const opus_int16*>view.buf
                if (<size_t>view.buf) & 1:
                    # A memoryview slice at an odd offset: copy so libopus reads aligned int16s.
                    aligned = <opus_int16*>PyMem_Malloc(view.len)
                    if aligned == NULL:
                        raise MemoryError()
                    memcpy(aligned, view.buf, view.len)
                    samples = aligned
                with nogil:
                    n = self.encode_raw(samples, out, OPUS_MAX_PACKET_BYTES)
            finally:
                self._busy = False
                if aligned != NULL:
                    PyMem_Free(aligned)
        finally:
            PyBuffer_Release(&view)
        if n < 0:
            raise _codec_error(n, "opus_encode")
        return PyBytes_FromStringAndSize(<char*>out, n)

    def reset(self):
        """Forget the signal history (e.g. between two unrelated tracks); settings are kept."""
        self._enter()
        try:
            _check(tc_opus_encoder_reset(self._enc), "reset encoder")
        finally:
            self._busy = False

    @property
    def application(self):
        return _APPLICATION_NAMES[self._application]

    @property
    def bitrate(self):
        """Target bitrate in bit/s (500-512000)."""
        return self._bitrate

    @bitrate.setter
    def bitrate(self, int value):
        _check_bitrate(value)
        self._enter()
        try:
            _check(tc_opus_set_bitrate(self._enc, value), "set bitrate")
            self._bitrate = value
        finally:
            self._busy = False

    @property
    def complexity(self):
        """Encoder complexity 0-10 (10: best quality, about 3x the CPU of 0)."""
        return self._complexity

    @complexity.setter
    def complexity(self, int value):
        _check_complexity(value)
        self._enter()
        try:
            _check(tc_opus_set_complexity(self._enc, value), "set complexity")
            self._complexity = value
        finally:
            self._busy = False

    @property
    def fec(self):
        """In-band forward error correction; turning it on also sets the expected loss (15 % if 0)."""
        return self._fec

    @fec.setter
    def fec(self, bint value):
        self._enter()
        try:
            self._fec = value
            self._apply_fec()
        finally:
            self._busy = False

    @property
    def expected_loss(self):
        """Packet loss percentage (0-100) told to libopus while FEC is on."""
        return self._expected_loss

    @expected_loss.setter
    def expected_loss(self, int value):
        _check_loss(value)
        self._enter()
        try:
            self._expected_loss = value
            self._apply_fec()
        finally:
            self._busy = False

    def __repr__(self):
        return (f"<Encoder {self.sample_rate} Hz x{self.channels} bitrate={self._bitrate} "
                f"complexity={self._complexity} fec={bool(self._fec)} expected_loss={self._expected_loss}>")


cdef class Decoder:
    """Opus decoder producing interleaved s16le PCM.

    ``decode(None)`` conceals a lost packet (PLC); ``decode(next_packet, fec=True)`` rebuilds a lost
    packet from the in-band FEC data carried by the packet that followed it (then decode
    ``next_packet`` normally as well).

    >>> dec = Decoder()
    >>> pcm = dec.decode(SILENCE_FRAME)   # 960 samples x 2 channels of s16le
    """

    def __cinit__(self):
        self._dec = NULL
        self._busy = False

    def __init__(self, *, int channels=2, int sample_rate=48000):
        cdef int err = OPUS_OK
        _check_layout(channels, sample_rate)
        if self._dec != NULL:
            opus_decoder_destroy(self._dec)
            self._dec = NULL
        self.channels = channels
        self.sample_rate = sample_rate
        self.frame_samples = sample_rate // 50
        self._dec = opus_decoder_create(sample_rate, channels, &err)
        if self._dec == NULL or err != OPUS_OK:
            self._dec = NULL
            raise _codec_error(err, "opus_decoder_create")

    def __dealloc__(self):
        if self._dec != NULL:
            opus_decoder_destroy(self._dec)
            self._dec = NULL

    cdef int decode_raw(self, const unsigned char* data, opus_int32 n, opus_int16* pcm,
                        int frame_size, bint fec) noexcept nogil:
        return opus_decode(self._dec, data, n, pcm, frame_size, 1 if fec else 0)

    cdef int _enter(self) except -1:
        if self._dec == NULL:
            raise RuntimeError("Decoder was not initialised")
        if self._busy:
            raise RuntimeError("this Decoder is being used by another thread")
        self._busy = True
        return 0

    def decode(self, packet, *, bint fec=False, frame_samples=None):
        """Decode one Opus packet into s16le interleaved PCM.

        ``packet=None`` means the packet was lost: libopus conceals ``frame_samples`` samples per
        channel (default 20 ms, i.e. 960 at 48 kHz). With ``fec=True`` the packet given is the one
        *after* the loss and its FEC data rebuilds the lost ``frame_samples``. A normal decode returns
        the packet's own duration. Invalid packets raise ``CodecError`` (a ``ValueError``).
        """
        cdef Py_buffer view
        cdef bint have_view = False
        cdef const unsigned char* data = NULL
        cdef opus_int32 n = 0
        cdef int want
        cdef int got
        cdef object out
        cdef opus_int16* pcm
        if frame_samples is None:
            want = self.frame_samples
        else:
            want = frame_samples
            # Concealment and FEC lengths must be whole 2.5 ms steps, at most 120 ms.
            if want <= 0 or want % (self.sample_rate // 400) or want > self.sample_rate // 1000 * 120:
                raise ValueError(f"frame_samples must be a positive multiple of 2.5 ms up to 120 ms, "
                                 f"not {frame_samples!r}")
        self._enter()
        try:
            if packet is not None:
                PyObject_GetBuffer(packet, &view, PyBUF_SIMPLE)
                have_view = True
                if view.len == 0:
                    raise CodecError("empty Opus packet (use None for a lost packet)")
                if view.len > 0x7FFFFFFF:
                    raise CodecError("Opus packet too large")
                data = <const unsigned char*>view.buf
                n = <opus_int32>view.len
                if not fec:
                    want = opus_decoder_get_nb_samples(self._dec, data, n)
                    if want < 0:
                        raise _codec_error(want, "opus_decoder_get_nb_samples")
                    if want == 0 or want > self.sample_rate // 1000 * 120:
                        raise _codec_error(OPUS_INVALID_PACKET, f"opus packet of {want} samples")
            out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>want * self.channels * 2)
            pcm = <opus_int16*>PyBytes_AS_STRING(out)
            with nogil:
                got = self.decode_raw(data, n, pcm, want, fec)
        finally:
            self._busy = False
            if have_view:
                PyBuffer_Release(&view)
        if got < 0:
            raise _codec_error(got, "opus_decode")
        if got != want:
            return out[:got * self.channels * 2]
        return out

    def reset(self):
        """Forget the decoder state (e.g. when a new talk spurt starts after a long gap)."""
        self._enter()
        try:
            _check(tc_opus_decoder_reset(self._dec), "reset decoder")
        finally:
            self._busy = False

    def __repr__(self):
        return f"<Decoder {self.sample_rate} Hz x{self.channels}>"


def packet_samples(packet) -> int:
    """Samples per channel (at 48 kHz) carried by an Opus packet; ``CodecError`` if it is invalid."""
    cdef Py_buffer view
    cdef int n
    PyObject_GetBuffer(packet, &view, PyBUF_SIMPLE)
    try:
        if view.len == 0:
            raise CodecError("empty Opus packet")
        if view.len > 0x7FFFFFFF:
            raise CodecError("Opus packet too large")
        n = opus_packet_get_nb_samples(<const unsigned char*>view.buf, <opus_int32>view.len, SAMPLE_RATE)
    finally:
        PyBuffer_Release(&view)
    if n < 0:
        raise _codec_error(n, "opus_packet_get_nb_samples")
    if n == 0:  # a code-3 packet announcing 0 frames: RFC 6716 section 3.2.5 forbids it
        raise _codec_error(OPUS_INVALID_PACKET, "opus packet of 0 samples")
    return n


cdef int _check_bitrate(int value) except -1:
    if not 500 <= value <= 512000:
        raise ConfigurationError(f"bitrate must be 500-512000 bit/s, not {value}")
    return 0


cdef int _check_complexity(int value) except -1:
    if not 0 <= value <= 10:
        raise ConfigurationError(f"complexity must be 0-10, not {value}")
    return 0


cdef int _check_loss(int value) except -1:
    if not 0 <= value <= 100:
        raise ConfigurationError(f"expected_loss must be 0-100 %, not {value}")
    return 0
