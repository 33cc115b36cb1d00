"""Transport encryption for Discord voice: the ``aead_aes256_gcm_rtpsize`` and
``aead_xchacha20_poly1305_rtpsize`` modes (spec §2.4).

Picks the compiled implementation (:mod:`telecom._fast.aead`, OpenSSL + libsodium, GIL released)
unless ``TELECOM_NO_EXTENSIONS=1``, then the pure-Python twin (:mod:`telecom._twin.aead`, cryptography
+ PyNaCl); both have the same API and the same errors. ``IMPLEMENTATION`` says which one is in use.

>>> from telecom.aead import TransportCipher, choose_mode
>>> from telecom.rtp import pack_header
>>> cipher = TransportCipher(choose_mode(["aead_xchacha20_poly1305_rtpsize"]), bytes(32))
>>> cipher.open(cipher.seal(pack_header(1, 960, 42), b"\\xf8\\xff\\xfe", counter=1)).payload
b'\\xf8\\xff\\xfe'
"""

from __future__ import annotations

from telecom._fast import NO_EXTENSIONS, load

if NO_EXTENSIONS:
    from telecom._twin import aead as _impl

    IMPLEMENTATION = "twin"
else:
    _impl = load("aead")
    IMPLEMENTATION = "fast"

SUPPORTED_MODES: tuple[str, ...] = _impl.SUPPORTED_MODES
choose_mode = _impl.choose_mode
TransportCipher = _impl.TransportCipher
OpenedPacket = _impl.OpenedPacket

__all__ = ["IMPLEMENTATION", "SUPPORTED_MODES", "choose_mode", "TransportCipher", "OpenedPacket"]
