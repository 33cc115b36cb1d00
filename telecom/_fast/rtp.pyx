# cython: language_level=3
"""RTP headers as Discord voice uses them (spec §2.3, §2.4 rtpsize rule, §2.7), compiled.

Owns: the RTP fixed header, CSRCs and the extension *preamble*; the rtpsize AAD length; RTP/RTCP
demultiplexing; sequence/timestamp/nonce-counter wrap-around arithmetic; RFC 8285 one-byte header
extension elements; RTP padding. It does no cryptography (that is telecom._fast.aead) and no I/O.

The C functions declared in rtp.pxd are what the native engine calls per packet; the Python API
below is the same as telecom._twin.rtp, which is the readable reference and is tested against it.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING

from enum import IntEnum

from telecom.errors import ConfigurationError, PacketError

__all__ = [
    "RtpHeader",
    "PacketKind",
    "parse_header",
    "pack_header",
    "classify",
    "seq_add",
    "seq_diff",
    "ts_add",
    "ts_diff",
    "counter_next",
    "parse_extension_elements",
    "strip_padding",
]


# ---------------------------------------------------------------------------------------------
# C level (the contract in rtp.pxd)
# ---------------------------------------------------------------------------------------------

cdef inline uint16_t _load16(const unsigned char* p) noexcept nogil:
    return <uint16_t>((<uint16_t>p[0] << 8) | p[1])


cdef inline uint32_t _load32(const unsigned char* p) noexcept nogil:
    return ((<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3])


cdef inline void _store16(unsigned char* p, uint16_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 8)
    p[1] = <unsigned char>v


cdef inline void _store32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v


cdef Py_ssize_t rtp_write_header(unsigned char* out, uint8_t payload_type, bint marker,
                                 uint16_t sequence, uint32_t timestamp, uint32_t ssrc) noexcept nogil:
    out[0] = 0x80                                   # V=2, P=0, X=0, CC=0
    out[1] = (payload_type & 0x7F) | (0x80 if marker else 0)
    _store16(out + 2, sequence)
    _store32(out + 4, timestamp)
    _store32(out + 8, ssrc)
    return RTP_HEADER_SIZE


cdef Py_ssize_t rtp_aad_length(const unsigned char* pkt, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t need
    if n < RTP_HEADER_SIZE or (pkt[0] >> 6) != 2:
        return -1
    need = RTP_HEADER_SIZE + 4 * (pkt[0] & 0x0F)
    if pkt[0] & 0x10:
        # rtpsize: only the 4-byte extension preamble is in the clear; the body is encrypted
        need += 4
    if need > n:
        return -1
    return need


cdef int rtp_classify(const unsigned char* pkt, Py_ssize_t n) noexcept nogil:
    # Anything shorter than an RTP fixed header is a keepalive echo (8 bytes, spec §2.2) or noise;
    # real RTCP from Discord is transport-encrypted and so always longer than 12 bytes.
    if n < RTP_HEADER_SIZE or (pkt[0] >> 6) != 2:
        return PACKET_OTHER                          # IP discovery replies start 0x00 0x02
    if 192 <= pkt[1] <= 223:                         # RFC 5761 demultiplexing (spec §2.7)
        return PACKET_RTCP
    return PACKET_RTP


# ---------------------------------------------------------------------------------------------
# Python level
# ---------------------------------------------------------------------------------------------

class PacketKind(IntEnum):
    """What :func:`classify` found in a datagram received on the voice socket."""

    OTHER = 0
    RTP = 1
    RTCP = 2


cdef object _KINDS = (PacketKind.OTHER, PacketKind.RTP, PacketKind.RTCP)


cdef inline int _check_range(object value, object limit, str name) except -1:
    if not 0 <= value <= limit:
        raise ConfigurationError(f"{name} must be in 0..{limit}, got {value!r}")
    return 0


cdef class RtpHeader:
    """One RTP header as it appears on the wire (RFC 3550 §5.1), immutable.

    For a transport-encrypted ``_rtpsize`` packet only the fixed header, the CSRCs and the 4-byte
    extension preamble (``extension_profile``, ``extension_length`` in 32-bit words) are in the clear;
    the extension body is the start of the ciphertext.

    >>> RtpHeader(sequence=1, timestamp=960, ssrc=42).pack().hex()
    '80780001000003c00000002a'
    """

    cdef readonly int version
    cdef readonly bint padding
    cdef readonly bint extension
    cdef readonly bint marker
    cdef readonly int payload_type
    cdef readonly uint16_t sequence
    cdef readonly uint32_t timestamp
    cdef readonly uint32_t ssrc
    cdef readonly tuple csrcs
    cdef readonly object extension_profile
    cdef readonly int extension_length

    def __init__(self, sequence, timestamp, ssrc, *, payload_type=0x78, marker=False, padding=False,
                 extension=None, csrcs=(), extension_profile=None, extension_length=0, version=2):
        _check_range(version, 3, "version")
        _check_range(payload_type, 0x7F, "payload_type")
        _check_range(sequence, 0xFFFF, "sequence")
        _check_range(timestamp, 0xFFFFFFFF, "timestamp")
        _check_range(ssrc, 0xFFFFFFFF, "ssrc")
        csrcs = tuple(csrcs)
        if len(csrcs) > 15:
            raise ConfigurationError(f"at most 15 CSRCs fit in an RTP header, got {len(csrcs)}")
        for c in csrcs:
            _check_range(c, 0xFFFFFFFF, "csrc")
        if extension is None:
            extension = extension_profile is not None
        if extension:
            if extension_profile is None:
                raise ConfigurationError("extension=True needs an extension_profile (e.g. 0xBEDE)")
            _check_range(extension_profile, 0xFFFF, "extension_profile")
            _check_range(extension_length, 0xFFFF, "extension_length")
        elif extension_profile is not None or extension_length:
            raise ConfigurationError("extension_profile/extension_length given but extension=False")
        self.version = version
        self.padding = padding
        self.extension = extension
        self.marker = marker
        self.payload_type = payload_type
        self.sequence = sequence
        self.timestamp = timestamp
        self.ssrc = ssrc
        self.csrcs = csrcs
        self.extension_profile = extension_profile
        self.extension_length = extension_length

    @property
    def header_length(self):
        """Bytes of the whole header including the extension body: 12 + 4·CC (+ 4 + 4·words if X)."""
        n = RTP_HEADER_SIZE + 4 * len(self.csrcs)
        if self.extension:
            n += 4 + 4 * self.extension_length
        return n

    @property
    def aad_length(self):
        """The rtpsize rule: bytes left in the clear and authenticated, 12 + 4·CC (+ 4 if X)."""
        return RTP_HEADER_SIZE + 4 * len(self.csrcs) + (4 if self.extension else 0)

    def pack(self):
        """The unencrypted part for sending: fixed header + CSRCs (+ extension preamble when X)."""
        cdef Py_ssize_t n = self.aad_length
        cdef Py_ssize_t i
        cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
        cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
        p[0] = <unsigned char>((self.version << 6) | (0x20 if self.padding else 0)
                               | (0x10 if self.extension else 0) | len(self.csrcs))
        p[1] = <unsigned char>((0x80 if self.marker else 0) | self.payload_type)
        _store16(p + 2, self.sequence)
        _store32(p + 4, self.timestamp)
        _store32(p + 8, self.ssrc)
        for i in range(len(self.csrcs)):
            _store32(p + RTP_HEADER_SIZE + 4 * i, <uint32_t>self.csrcs[i])
        if self.extension:
            _store16(p + n - 4, <uint16_t>self.extension_profile)
            _store16(p + n - 2, <uint16_t>self.extension_length)
        return out

    cdef tuple _key(self):
        return (self.version, self.padding, self.extension, self.marker, self.payload_type,
                self.sequence, self.timestamp, self.ssrc, self.csrcs, self.extension_profile,
                self.extension_length)

    def __eq__(self, other):
        if not isinstance(other, RtpHeader):
            return NotImplemented
        return self._key() == (<RtpHeader>other)._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        profile = "None" if self.extension_profile is None else f"0x{self.extension_profile:04x}"
        return (
            f"RtpHeader(version={self.version}, padding={self.padding}, extension={self.extension}, "
            f"marker={self.marker}, payload_type={self.payload_type}, sequence={self.sequence}, "
            f"timestamp={self.timestamp}, ssrc={self.ssrc}, csrcs={self.csrcs!r}, "
            f"extension_profile={profile}, extension_length={self.extension_length})"
        )


cdef RtpHeader _parse(const unsigned char* p, Py_ssize_t n):
    cdef int cc
    cdef Py_ssize_t need, i
    cdef RtpHeader h
    if n < RTP_HEADER_SIZE:
        raise PacketError(f"RTP packet too short: {n} bytes, the fixed header is 12")
    if (p[0] >> 6) != 2:
        raise PacketError(f"not an RTP packet: version {p[0] >> 6}, expected 2")
    cc = p[0] & 0x0F
    need = RTP_HEADER_SIZE + 4 * cc
    if need > n:
        raise PacketError(f"RTP header with {cc} CSRCs needs {need} bytes, packet has {n}")
    h = RtpHeader.__new__(RtpHeader)
    h.version = 2
    h.padding = (p[0] & 0x20) != 0
    h.extension = (p[0] & 0x10) != 0
    h.marker = (p[1] & 0x80) != 0
    h.payload_type = p[1] & 0x7F
    h.sequence = _load16(p + 2)
    h.timestamp = _load32(p + 4)
    h.ssrc = _load32(p + 8)
    h.csrcs = tuple([_load32(p + RTP_HEADER_SIZE + 4 * i) for i in range(cc)])
    h.extension_profile = None
    h.extension_length = 0
    if h.extension:
        if need + 4 > n:
            raise PacketError(
                f"RTP header extension preamble truncated: needs {need + 4} bytes, packet has {n}")
        h.extension_profile = _load16(p + need)
        h.extension_length = _load16(p + need + 2)
    return h


def parse_header(packet):
    """Parse the fixed header, CSRCs and extension preamble of ``packet`` (any bytes-like).

    Raises :class:`~telecom.errors.PacketError` when the packet is too short, is not version 2, or
    its CSRC count or extension preamble runs past the end.
    """
    cdef Py_buffer view
    PyObject_GetBuffer(packet, &view, PyBUF_SIMPLE)
    try:
        return _parse(<const unsigned char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


def pack_header(sequence, timestamp, ssrc, payload_type=0x78, marker=False):
    """The 12-byte RTP header Discord expects on every sent packet (spec §2.3)."""
    _check_range(sequence, 0xFFFF, "sequence")
    _check_range(timestamp, 0xFFFFFFFF, "timestamp")
    _check_range(ssrc, 0xFFFFFFFF, "ssrc")
    _check_range(payload_type, 0x7F, "payload_type")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, RTP_HEADER_SIZE)
    rtp_write_header(<unsigned char*>PyBytes_AS_STRING(out), <uint8_t>payload_type, bool(marker),
                     <uint16_t>sequence, <uint32_t>timestamp, <uint32_t>ssrc)
    return out


def classify(packet):
    """Tell RTP, RTCP and everything else apart on the shared voice socket (spec §2.7)."""
    cdef Py_buffer view
    cdef int kind
    PyObject_GetBuffer(packet, &view, PyBUF_SIMPLE)
    kind = rtp_classify(<const unsigned char*>view.buf, view.len)
    PyBuffer_Release(&view)
    return _KINDS[kind]


def seq_add(seq, n):
    """``seq + n`` modulo 2^16 (RTP sequence numbers wrap 65535 → 0)."""
    return (seq + n) & 0xFFFF


def seq_diff(a, b):
    """Signed distance ``a - b`` between two sequence numbers, in (−2^15, 2^15]."""
    d = (a - b) & 0xFFFF
    return d - 0x10000 if d > 0x8000 else d


def ts_add(ts, n):
    """``ts + n`` modulo 2^32 (RTP timestamps wrap; never reset to 0 like discord.py does)."""
    return (ts + n) & 0xFFFFFFFF


def ts_diff(a, b):
    """Signed distance ``a - b`` between two RTP timestamps, in (−2^31, 2^31]."""
    d = (a - b) & 0xFFFFFFFF
    return d - 0x100000000 if d > 0x80000000 else d


def counter_next(c):
    """The next 32-bit transport nonce counter (wraps 2^32 − 1 → 0)."""
    return (c + 1) & 0xFFFFFFFF


def parse_extension_elements(body):
    """Split an RFC 8285 one-byte-header (profile 0xBEDE) extension body into ``[(id, data), ...]``.

    Zero bytes are padding and are skipped; id 15 ends parsing (RFC 8285 §4.2). Raises
    :class:`~telecom.errors.PacketError` when an element runs past the end of ``body``.
    """
    cdef bytes data = bytes(body)
    cdef const unsigned char* b = data
    cdef Py_ssize_t n = len(data)
    cdef Py_ssize_t pos = 0
    cdef int ident, length
    out = []
    while pos < n:
        ident = b[pos] >> 4
        if ident == 0:                  # padding byte between or after elements
            pos += 1
            continue
        if ident == 15:                 # reserved: stop, keep what came before
            break
        length = (b[pos] & 0x0F) + 1
        if pos + 1 + length > n:
            raise PacketError(
                f"RTP header extension element (id {ident}) needs {length} bytes at offset "
                f"{pos + 1}, only {n - pos - 1} left")
        out.append((ident, data[pos + 1:pos + 1 + length]))
        pos += 1 + length
    return out


def strip_padding(payload):
    """Remove RTP padding (P bit set): the last byte counts the padding bytes, itself included."""
    payload = bytes(payload)
    n = len(payload)
    if n == 0:
        raise PacketError("RTP padding bit set but the payload is empty")
    count = payload[n - 1]
    if count == 0:
        raise PacketError("RTP padding count is 0 (must be at least 1)")
    if count > n:
        raise PacketError(f"RTP padding count {count} exceeds the {n}-byte payload")
    return payload[:n - count]
