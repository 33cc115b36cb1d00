"""RTP parsing and the ``_rtpsize`` transport AEAD, as the local voice server sees them.

This module owns the server's own, independent reading and writing of voice packets (spec §2.3,
§2.4, §2.7). It must never import telecom's wire code (``telecom._fast``, ``telecom.rtp``, ...): the
server checks what telecom sends, and a checker that shares the code under test proves nothing.
AEAD comes from PyNaCl (XChaCha20-Poly1305, IETF) and ``cryptography`` (AES-256-GCM).

The "rtpsize" rule: the authenticated-but-clear part (AAD) is the 12-byte fixed header, the CSRC
list and, when X=1, only the 4-byte extension preamble. The extension *body* travels encrypted: it
is the first ``4 * length`` bytes of the plaintext. RTP padding (P=1) is stripped after opening.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

from telecom.errors import DecryptError, PacketError

AEAD_AES256_GCM_RTPSIZE = "aead_aes256_gcm_rtpsize"
AEAD_XCHACHA20_POLY1305_RTPSIZE = "aead_xchacha20_poly1305_rtpsize"
#: Offered in Ready in this order (Discord lists AES-GCM first when it offers it).
SUPPORTED_MODES = (AEAD_AES256_GCM_RTPSIZE, AEAD_XCHACHA20_POLY1305_RTPSIZE)

OPUS_PAYLOAD_TYPE = 0x78
SILENCE_FRAME = b"\xf8\xff\xfe"
TAG_SIZE = 16
COUNTER_SIZE = 4
#: RFC 8285 one-byte-header extension profile, the one Discord's SFU uses.
ONE_BYTE_EXTENSION_PROFILE = 0xBEDE


@dataclass(frozen=True)
class RtpHeader:
    """The clear fields of an RTP packet; ``aad_size`` is where the ciphertext starts."""

    version: int
    padding: bool
    extension: bool
    csrc_count: int
    marker: bool
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    aad_size: int
    extension_words: int


def is_rtcp(packet: bytes) -> bool:
    """RTCP shares the 5-tuple (RFC 5761): its second byte (packet type) is 192–223."""
    return len(packet) >= 2 and 192 <= packet[1] <= 223


def parse_header(packet: bytes) -> RtpHeader:
    """Parse the clear RTP header; raise :class:`PacketError` on anything malformed."""
    if len(packet) < 12:
        raise PacketError(f"RTP packet too short ({len(packet)} bytes)")
    b0, b1, sequence, timestamp, ssrc = struct.unpack_from(">BBHII", packet, 0)
    version = b0 >> 6
    if version != 2:
        raise PacketError(f"RTP version {version}, expected 2")
    csrc_count = b0 & 0x0F
    extension = bool(b0 & 0x10)
    aad_size = 12 + 4 * csrc_count
    extension_words = 0
    if extension:
        if len(packet) < aad_size + 4:
            raise PacketError("RTP extension preamble truncated")
        (extension_words,) = struct.unpack_from(">H", packet, aad_size + 2)
        aad_size += 4
    if len(packet) < aad_size + TAG_SIZE + COUNTER_SIZE:
        raise PacketError(f"packet of {len(packet)} bytes cannot hold the tag and nonce counter")
    return RtpHeader(
        version=version,
        padding=bool(b0 & 0x20),
        extension=extension,
        csrc_count=csrc_count,
        marker=bool(b1 & 0x80),
        payload_type=b1 & 0x7F,
        sequence=sequence,
        timestamp=timestamp,
        ssrc=ssrc,
        aad_size=aad_size,
        extension_words=extension_words,
    )


class TransportCipher:
    """One member's transport key in one ``_rtpsize`` mode: open what they send, seal what they get."""

    def __init__(self, mode: str, key: bytes) -> None:
        if mode not in SUPPORTED_MODES:
            raise ValueError(f"unsupported transport mode {mode!r}")
        if len(key) != 32:
            raise ValueError("transport keys are 32 bytes")
        self.mode = mode
        self.key = bytes(key)
        self._aesgcm = AESGCM(self.key) if mode == AEAD_AES256_GCM_RTPSIZE else None

    def _nonce(self, counter: bytes) -> bytes:
        # The 4-byte BE counter goes first, the rest is zero: 12 bytes for AES-GCM, 24 for XChaCha.
        return counter + bytes(8 if self._aesgcm is not None else 20)

    def seal(self, aad: bytes, plaintext: bytes, counter: int) -> bytes:
        """``aad ‖ ciphertext ‖ tag ‖ counter`` (spec §2.4)."""
        counter_bytes = struct.pack(">I", counter & 0xFFFFFFFF)
        nonce = self._nonce(counter_bytes)
        if self._aesgcm is not None:
            sealed = self._aesgcm.encrypt(nonce, plaintext, aad)
        else:
            sealed = crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, self.key)
        return aad + sealed + counter_bytes

    def open(self, packet: bytes) -> tuple[RtpHeader, int, bytes]:
        """Return ``(header, counter, payload)``: payload has the extension body and padding removed."""
        header = parse_header(packet)
        counter_bytes = packet[-COUNTER_SIZE:]
        aad = packet[: header.aad_size]
        sealed = packet[header.aad_size : -COUNTER_SIZE]
        nonce = self._nonce(counter_bytes)
        try:
            if self._aesgcm is not None:
                plaintext = self._aesgcm.decrypt(nonce, sealed, aad)
            else:
                plaintext = crypto_aead_xchacha20poly1305_ietf_decrypt(sealed, aad, nonce, self.key)
        except (InvalidTag, CryptoError) as exc:
            raise DecryptError(f"{self.mode} authentication failed") from exc
        if header.extension:
            skip = 4 * header.extension_words
            if skip > len(plaintext):
                raise PacketError("encrypted extension body longer than the plaintext")
            plaintext = plaintext[skip:]
        if header.padding:
            if not plaintext or plaintext[-1] == 0 or plaintext[-1] > len(plaintext):
                raise PacketError("bad RTP padding count")
            plaintext = plaintext[: -plaintext[-1]]
        (counter,) = struct.unpack(">I", counter_bytes)
        return header, counter, bytes(plaintext)


def relay_packet(
    cipher: TransportCipher,
    counter: int,
    *,
    marker: bool,
    payload_type: int,
    sequence: int,
    timestamp: int,
    ssrc: int,
    payload: bytes,
    audio_level: int,
) -> bytes:
    """Build what the SFU sends a receiver: X=1, a 0xBEDE audio-level element inside the ciphertext.

    The element is RFC 6464 audio level (id 1, one data byte: V flag + level in -dBov), padded to
    one 32-bit word, so the preamble says ``length = 1`` and the receiver must skip 4 bytes of
    plaintext before the Opus (or DAVE) frame.
    """
    b0 = 0x80 | 0x10  # V=2, X=1, no padding, no CSRC
    b1 = (0x80 if marker else 0) | (payload_type & 0x7F)
    aad = struct.pack(">BBHIIHH", b0, b1, sequence, timestamp, ssrc, ONE_BYTE_EXTENSION_PROFILE, 1)
    level = max(0, min(127, audio_level))
    extension_body = bytes((0x10, 0x80 | level, 0, 0))  # id=1, L=0 (one byte), value, padding
    return cipher.seal(aad, extension_body + payload, counter)
