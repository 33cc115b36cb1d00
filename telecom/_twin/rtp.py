"""RTP headers as Discord voice uses them (spec §2.3, §2.4 rtpsize rule, §2.7), in pure Python.

The readable reference for telecom._fast.rtp, with the same Python API and the same error messages;
``TELECOM_NO_EXTENSIONS=1`` selects it. Owns header parsing/packing, RTP/RTCP demultiplexing,
wrap-around arithmetic, RFC 8285 one-byte extension elements and RTP padding. No crypto, no I/O.
"""

from __future__ import annotations

import struct
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

RTP_HEADER_SIZE = 12
_FIXED = struct.Struct(">BBHII")   # V/P/X/CC, M/PT, sequence, timestamp, SSRC
_PREAMBLE = struct.Struct(">HH")   # extension profile, length in 32-bit words


class PacketKind(IntEnum):
    """What :func:`classify` found in a datagram received on the voice socket."""

    OTHER = 0
    RTP = 1
    RTCP = 2


def _check_range(value: int, limit: int, name: str) -> None:
    if not 0 <= value <= limit:
        raise ConfigurationError(f"{name} must be in 0..{limit}, got {value!r}")


class RtpHeader:
    """One RTP header as it appears on the wire (RFC 3550 §5.1), immutable.

    For a transport-encrypted ``_rtpsize`` packet only the fixed header, the CSRCs and the 4-byte
    extension preamble (``extension_profile``, ``extension_length`` in 32-bit words) are in the clear;
    the extension body is the start of the ciphertext.

    >>> RtpHeader(sequence=1, timestamp=960, ssrc=42).pack().hex()
    '80780001000003c00000002a'
    """

    __slots__ = ("version", "padding", "extension", "marker", "payload_type", "sequence",
                 "timestamp", "ssrc", "csrcs", "extension_profile", "extension_length")

    version: int
    padding: bool
    extension: bool
    marker: bool
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    csrcs: tuple[int, ...]
    extension_profile: int | None
    extension_length: int

    def __init__(self, sequence: int, timestamp: int, ssrc: int, *, payload_type: int = 0x78,
                 marker: bool = False, padding: bool = False, extension: bool | None = None,
                 csrcs=(), extension_profile: int | None = None, extension_length: int = 0,
                 version: int = 2) -> None:
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
        values = (version, bool(padding), bool(extension), bool(marker), payload_type, sequence,
                  timestamp, ssrc, csrcs, extension_profile, extension_length)
        for name, value in zip(self.__slots__, values):
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"RtpHeader is immutable (cannot set {name!r})")

    @property
    def header_length(self) -> int:
        """Bytes of the whole header including the extension body: 12 + 4·CC (+ 4 + 4·words if X)."""
        n = RTP_HEADER_SIZE + 4 * len(self.csrcs)
        if self.extension:
            n += 4 + 4 * self.extension_length
        return n

    @property
    def aad_length(self) -> int:
        """The rtpsize rule: bytes left in the clear and authenticated, 12 + 4·CC (+ 4 if X)."""
        return RTP_HEADER_SIZE + 4 * len(self.csrcs) + (4 if self.extension else 0)

    def pack(self) -> bytes:
        """The unencrypted part for sending: fixed header + CSRCs (+ extension preamble when X)."""
        b0 = (self.version << 6) | (0x20 if self.padding else 0) | (0x10 if self.extension else 0)
        b0 |= len(self.csrcs)
        b1 = (0x80 if self.marker else 0) | self.payload_type
        out = _FIXED.pack(b0, b1, self.sequence, self.timestamp, self.ssrc)
        out += b"".join(c.to_bytes(4, "big") for c in self.csrcs)
        if self.extension:
            out += _PREAMBLE.pack(self.extension_profile, self.extension_length)
        return out

    def _key(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RtpHeader):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        profile = "None" if self.extension_profile is None else f"0x{self.extension_profile:04x}"
        return (
            f"RtpHeader(version={self.version}, padding={self.padding}, extension={self.extension}, "
            f"marker={self.marker}, payload_type={self.payload_type}, sequence={self.sequence}, "
            f"timestamp={self.timestamp}, ssrc={self.ssrc}, csrcs={self.csrcs!r}, "
            f"extension_profile={profile}, extension_length={self.extension_length})"
        )


def rtp_aad_length(packet: bytes) -> int:
    """The rtpsize rule (spec §2.4): 12 + 4·CC (+ 4 if X); -1 if short or not version 2."""
    n = len(packet)
    if n < RTP_HEADER_SIZE or packet[0] >> 6 != 2:
        return -1
    need = RTP_HEADER_SIZE + 4 * (packet[0] & 0x0F) + (4 if packet[0] & 0x10 else 0)
    return need if need <= n else -1


def parse_header(packet) -> RtpHeader:
    """Parse the fixed header, CSRCs and extension preamble of ``packet`` (any bytes-like).

    Raises :class:`~telecom.errors.PacketError` when the packet is too short, is not version 2, or
    its CSRC count or extension preamble runs past the end.
    """
    packet = bytes(packet)
    n = len(packet)
    if n < RTP_HEADER_SIZE:
        raise PacketError(f"RTP packet too short: {n} bytes, the fixed header is 12")
    b0, b1, sequence, timestamp, ssrc = _FIXED.unpack_from(packet)
    if b0 >> 6 != 2:
        raise PacketError(f"not an RTP packet: version {b0 >> 6}, expected 2")
    cc = b0 & 0x0F
    need = RTP_HEADER_SIZE + 4 * cc
    if need > n:
        raise PacketError(f"RTP header with {cc} CSRCs needs {need} bytes, packet has {n}")
    csrcs = struct.unpack_from(f">{cc}I", packet, RTP_HEADER_SIZE)
    profile = None
    words = 0
    if b0 & 0x10:
        if need + 4 > n:
            raise PacketError(
                f"RTP header extension preamble truncated: needs {need + 4} bytes, packet has {n}")
        profile, words = _PREAMBLE.unpack_from(packet, need)
    return RtpHeader(sequence, timestamp, ssrc, payload_type=b1 & 0x7F, marker=bool(b1 & 0x80),
                     padding=bool(b0 & 0x20), extension=bool(b0 & 0x10), csrcs=csrcs,
                     extension_profile=profile, extension_length=words)


def pack_header(sequence: int, timestamp: int, ssrc: int, payload_type: int = 0x78,
                marker: bool = False) -> bytes:
    """The 12-byte RTP header Discord expects on every sent packet (spec §2.3)."""
    _check_range(sequence, 0xFFFF, "sequence")
    _check_range(timestamp, 0xFFFFFFFF, "timestamp")
    _check_range(ssrc, 0xFFFFFFFF, "ssrc")
    _check_range(payload_type, 0x7F, "payload_type")
    return _FIXED.pack(0x80, (0x80 if marker else 0) | payload_type, sequence, timestamp, ssrc)


def classify(packet) -> PacketKind:
    """Tell RTP, RTCP and everything else apart on the shared voice socket (spec §2.7)."""
    packet = memoryview(packet).cast("B")
    # Shorter than an RTP fixed header: a keepalive echo (8 bytes, spec §2.2) or noise; Discord's
    # RTCP is transport-encrypted and so always longer. IP discovery replies start 0x00 (version 0).
    if len(packet) < RTP_HEADER_SIZE or packet[0] >> 6 != 2:
        return PacketKind.OTHER
    if 192 <= packet[1] <= 223:                      # RFC 5761 demultiplexing
        return PacketKind.RTCP
    return PacketKind.RTP


def seq_add(seq: int, n: int) -> int:
    """``seq + n`` modulo 2^16 (RTP sequence numbers wrap 65535 → 0)."""
    return (seq + n) & 0xFFFF


def seq_diff(a: int, b: int) -> int:
    """Signed distance ``a - b`` between two sequence numbers, in (−2^15, 2^15]."""
    d = (a - b) & 0xFFFF
    return d - 0x10000 if d > 0x8000 else d


def ts_add(ts: int, n: int) -> int:
    """``ts + n`` modulo 2^32 (RTP timestamps wrap; never reset to 0 like discord.py does)."""
    return (ts + n) & 0xFFFFFFFF


def ts_diff(a: int, b: int) -> int:
    """Signed distance ``a - b`` between two RTP timestamps, in (−2^31, 2^31]."""
    d = (a - b) & 0xFFFFFFFF
    return d - 0x100000000 if d > 0x80000000 else d


def counter_next(c: int) -> int:
    """The next 32-bit transport nonce counter (wraps 2^32 − 1 → 0)."""
    return (c + 1) & 0xFFFFFFFF


def parse_extension_elements(body) -> list[tuple[int, bytes]]:
    """Split an RFC 8285 one-byte-header (profile 0xBEDE) extension body into ``[(id, data), ...]``.

    Zero bytes are padding and are skipped; id 15 ends parsing (RFC 8285 §4.2). Raises
    :class:`~telecom.errors.PacketError` when an element runs past the end of ``body``.
    """
    data = bytes(body)
    n = len(data)
    pos = 0
    out = []
    while pos < n:
        ident = data[pos] >> 4
        if ident == 0:                  # padding byte between or after elements
            pos += 1
            continue
        if ident == 15:                 # reserved: stop, keep what came before
            break
        length = (data[pos] & 0x0F) + 1
        if pos + 1 + length > n:
            raise PacketError(
                f"RTP header extension element (id {ident}) needs {length} bytes at offset "
                f"{pos + 1}, only {n - pos - 1} left")
        out.append((ident, data[pos + 1:pos + 1 + length]))
        pos += 1 + length
    return out


def strip_padding(payload) -> bytes:
    """Remove RTP padding (P bit set): the last byte counts the padding bytes, itself included."""
    payload = bytes(payload)
    n = len(payload)
    if n == 0:
        raise PacketError("RTP padding bit set but the payload is empty")
    count = payload[-1]
    if count == 0:
        raise PacketError("RTP padding count is 0 (must be at least 1)")
    if count > n:
        raise PacketError(f"RTP padding count {count} exceeds the {n}-byte payload")
    return payload[:n - count]
