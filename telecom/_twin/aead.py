"""Transport encryption of Discord's `_rtpsize` AEAD modes (spec §2.4), in pure Python.

The readable reference for telecom._fast.aead, with the same Python API and the same error messages;
``TELECOM_NO_EXTENSIONS=1`` selects it. The primitives come from ``cryptography`` (AES-256-GCM) and
PyNaCl (XChaCha20-Poly1305 IETF), imported only when a cipher is created, so that importing telecom
does not need them. Owns the nonce and packet layout and the receive-side rtpsize rule; the caller
owns the counter and must never repeat it under one key.

Packet layout (both modes)::

    header (AAD) ‖ ciphertext ‖ tag (16) ‖ counter (4, big-endian)
    nonce = counter (4, big-endian) ‖ zeros (8 for AES-GCM, 20 for XChaCha)
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

from telecom._twin.rtp import RtpHeader, parse_header, rtp_aad_length
from telecom.errors import ConfigurationError, DecryptError, PacketError

__all__ = ["SUPPORTED_MODES", "choose_mode", "TransportCipher", "OpenedPacket"]

AES256_GCM_RTPSIZE = "aead_aes256_gcm_rtpsize"
XCHACHA20_POLY1305_RTPSIZE = "aead_xchacha20_poly1305_rtpsize"

# Order = preference: AES-GCM when the server offers it (hardware AES, spec §0), else XChaCha.
SUPPORTED_MODES = (AES256_GCM_RTPSIZE, XCHACHA20_POLY1305_RTPSIZE)

TAG_SIZE = 16
COUNTER_SIZE = 4
OVERHEAD = TAG_SIZE + COUNTER_SIZE
_NONCE_ZEROS = {AES256_GCM_RTPSIZE: bytes(8), XCHACHA20_POLY1305_RTPSIZE: bytes(20)}


class OpenedPacket(NamedTuple):
    """A received packet after transport decryption.

    ``header`` is the parsed :class:`~telecom.rtp.RtpHeader`; ``payload`` the Opus/DAVE frame with the
    encrypted extension body skipped and RTP padding removed; ``extension_body`` the decrypted header
    extension body (empty without X); ``counter`` the 32-bit nonce counter the sender used.
    """

    header: RtpHeader
    payload: bytes
    extension_body: bytes
    counter: int


def choose_mode(offered: Iterable[str]) -> str:
    """Pick the transport mode from the server's ``modes`` list (Ready, op 2).

    AES-256-GCM when offered, else XChaCha20-Poly1305; :class:`~telecom.errors.ConfigurationError`
    if the server offers neither.
    """
    offered = set(offered)
    for mode in SUPPORTED_MODES:
        if mode in offered:
            return mode
    raise ConfigurationError(
        f"the voice server offers none of telecom's transport modes {SUPPORTED_MODES!r} "
        f"(offered: {sorted(offered)!r})")


def _key_bytes(key) -> bytes:
    if isinstance(key, (str, int)):
        raise ConfigurationError(f"the transport key must be 32 bytes, got {type(key).__name__}")
    try:
        raw = bytes(key) if isinstance(key, (list, tuple)) else bytes(memoryview(key))
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"the transport key must be 32 bytes: {exc}") from None
    if len(raw) != 32:
        raise ConfigurationError(f"the transport key must be exactly 32 bytes, got {len(raw)}")
    return raw


def _check_mode(mode: str) -> None:
    if mode not in SUPPORTED_MODES:
        raise ConfigurationError(
            f"unsupported transport encryption mode {mode!r}; telecom supports {SUPPORTED_MODES!r}")


class _Primitive:
    """The bare AEAD of one mode with a caller-chosen nonce: ``encrypt -> ct ‖ tag``."""

    def __init__(self, mode: str, key: bytes) -> None:
        self.mode = mode
        if mode == AES256_GCM_RTPSIZE:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._aesgcm = AESGCM(key)   # keyed once, like the compiled module's EVP context
        else:
            from nacl import bindings

            self._bindings = bindings
            self._key = key

    def encrypt(self, nonce: bytes, aad: bytes, plaintext: bytes) -> bytes:
        if self.mode == AES256_GCM_RTPSIZE:
            return self._aesgcm.encrypt(nonce, plaintext, aad)
        return self._bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, self._key)

    def decrypt(self, nonce: bytes, aad: bytes, ciphertext_and_tag: bytes) -> bytes | None:
        """Plaintext, or None when authentication fails."""
        if self.mode == AES256_GCM_RTPSIZE:
            from cryptography.exceptions import InvalidTag

            try:
                return self._aesgcm.decrypt(nonce, ciphertext_and_tag, aad)
            except InvalidTag:
                return None
        from nacl.exceptions import CryptoError

        try:
            return self._bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                ciphertext_and_tag, aad, nonce, self._key)
        except CryptoError:
            return None


class TransportCipher:
    """Seals and opens voice packets for one ``_rtpsize`` mode and one 32-byte ``secret_key``.

    >>> from telecom.rtp import pack_header
    >>> c = TransportCipher("aead_aes256_gcm_rtpsize", bytes(32))
    >>> packet = c.seal(pack_header(1, 960, 42), b"\\xf8\\xff\\xfe", counter=7)
    >>> c.open(packet).payload
    b'\\xf8\\xff\\xfe'
    """

    __slots__ = ("mode", "_primitive", "_zeros")

    def __init__(self, mode: str, key) -> None:
        _check_mode(mode)
        raw = _key_bytes(key)
        self.mode = mode
        self._primitive = _Primitive(mode, raw)
        self._zeros = _NONCE_ZEROS[mode]

    def __repr__(self) -> str:
        return f"<TransportCipher mode={self.mode!r}>"

    def __reduce__(self):
        raise TypeError("TransportCipher holds a secret key and cannot be pickled")

    def seal(self, header, payload, counter: int) -> bytes:
        """Return ``header ‖ AEAD(payload, aad=header) ‖ tag(16) ‖ counter(4, BE)``.

        ``header`` is the unencrypted part (normally ``RtpHeader.pack()`` or ``pack_header(...)``);
        an extension body, if any, goes at the start of ``payload``. ``counter`` is the 32-bit nonce
        counter; never reuse one under the same key.
        """
        if not 0 <= counter <= 0xFFFFFFFF:
            raise ConfigurationError(f"counter must be in 0..4294967295, got {counter!r}")
        header = bytes(header)
        prefix = counter.to_bytes(4, "big")
        sealed = self._primitive.encrypt(prefix + self._zeros, header, bytes(payload))
        return header + sealed + prefix

    def open(self, packet) -> OpenedPacket:
        """Authenticate and decrypt one received RTP packet; return an :class:`OpenedPacket`.

        Raises :class:`~telecom.errors.PacketError` for short or malformed packets and
        :class:`~telecom.errors.DecryptError` when authentication fails.
        """
        packet = bytes(packet)
        n = len(packet)
        aad_len = rtp_aad_length(packet)
        if aad_len < 0:
            parse_header(packet)                 # raises the precise PacketError
            raise PacketError("malformed RTP header")   # not reached
        if n < aad_len + OVERHEAD:
            raise PacketError(
                f"packet too short for {self.mode}: {n} bytes, needs at least {aad_len + OVERHEAD} "
                f"({aad_len}-byte header + 16-byte tag + 4-byte nonce counter)")
        prefix = packet[-COUNTER_SIZE:]
        counter = int.from_bytes(prefix, "big")
        plaintext = self._primitive.decrypt(prefix + self._zeros, packet[:aad_len],
                                            packet[aad_len:-COUNTER_SIZE])
        if plaintext is None:
            raise DecryptError(f"packet failed authentication ({self.mode}, nonce counter {counter})")
        # Authentic from here on: the checks below see what the sender really wrote.
        skip = 0
        if packet[0] & 0x10:
            # rtpsize: the extension body (length from the clear preamble) is encrypted
            words = int.from_bytes(packet[aad_len - 2:aad_len], "big")
            skip = 4 * words
            if skip > len(plaintext):
                raise PacketError(
                    f"RTP header extension length {words} words ({skip} bytes) exceeds the "
                    f"{len(plaintext)}-byte decrypted payload")
        payload = plaintext[skip:]
        if packet[0] & 0x20:
            rest = len(payload)
            if rest == 0:
                raise PacketError("RTP padding bit set but the payload is empty")
            count = payload[-1]
            if count == 0:
                raise PacketError("RTP padding count is 0 (must be at least 1)")
            if count > rest:
                raise PacketError(f"RTP padding count {count} exceeds the {rest}-byte payload")
            payload = payload[:rest - count]
        return OpenedPacket(parse_header(packet), payload, plaintext[:skip], counter)

    def open_rtcp(self, packet) -> bytes:
        """Decrypt a transport-encrypted RTCP packet; return it in the clear (header ‖ body).

        Follows songbird: AAD = the 8-byte fixed RTCP header (V/P/RC, PT, length, sender SSRC), the
        rest laid out like RTP (ciphertext ‖ tag ‖ counter). **UNCONFIRMED** beyond songbird (spec §2.7).
        """
        packet = bytes(packet)
        n = len(packet)
        if n >= 1 and packet[0] >> 6 != 2:
            raise PacketError(f"not an RTCP packet: version {packet[0] >> 6}, expected 2")
        if n < 8 + OVERHEAD:
            raise PacketError(f"RTCP packet too short for {self.mode}: {n} bytes, needs at least 28")
        prefix = packet[-COUNTER_SIZE:]
        body = self._primitive.decrypt(prefix + self._zeros, packet[:8], packet[8:-COUNTER_SIZE])
        if body is None:
            counter = int.from_bytes(prefix, "big")
            raise DecryptError(
                f"RTCP packet failed authentication ({self.mode}, nonce counter {counter})")
        return packet[:8] + body


# Test hooks: the bare AEAD primitive with a caller-chosen nonce (known-answer vectors).

def _primitive_for(mode: str, key, nonce) -> _Primitive:
    _check_mode(mode)
    raw = _key_bytes(key)
    expected = 12 if mode == AES256_GCM_RTPSIZE else 24
    if len(nonce) != expected:
        raise ConfigurationError(f"{mode} takes a {expected}-byte nonce, got {len(nonce)}")
    return _Primitive(mode, raw)


def _aead_primitive_encrypt(mode: str, key, nonce, aad, plaintext) -> bytes:
    """``ciphertext ‖ tag`` of the raw AEAD for ``mode`` (test hook)."""
    return _primitive_for(mode, key, nonce).encrypt(bytes(nonce), bytes(aad), bytes(plaintext))


def _aead_primitive_decrypt(mode: str, key, nonce, aad, ciphertext_and_tag) -> bytes:
    """Inverse of :func:`_aead_primitive_encrypt`; DecryptError when the tag does not verify."""
    if len(ciphertext_and_tag) < TAG_SIZE:
        raise PacketError("ciphertext shorter than the 16-byte tag")
    out = _primitive_for(mode, key, nonce).decrypt(bytes(nonce), bytes(aad), bytes(ciphertext_and_tag))
    if out is None:
        raise DecryptError(f"{mode} authentication failed")
    return out
