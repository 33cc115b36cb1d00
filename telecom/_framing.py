"""Opus packets in an HTTP body: each packet preceded by its length, 2 bytes big-endian.

``POST .../tracks/{id}/opus`` carries several 20 ms packets per request this way (the node) and
:class:`telecom.remote.RemoteOpusPipe` writes them (the client); it lives outside ``telecom.server`` because
the core library never imports the server package. A length of 0 or over 1275 (RFC 6716's
largest packet) is refused, as is a body that ends inside a length or a packet.
"""

from __future__ import annotations

from typing import Iterable

MAX_OPUS_PACKET = 1275


def pack_length_prefixed(packets: Iterable[bytes]) -> bytes:
    out = bytearray()
    for i, packet in enumerate(packets):
        n = len(packet)
        if not 1 <= n <= MAX_OPUS_PACKET:
            raise ValueError(f"packet {i} is {n} bytes; an Opus packet is 1..{MAX_OPUS_PACKET}")
        out += n.to_bytes(2, "big")
        out += packet
    return bytes(out)


def split_length_prefixed(body: bytes) -> list[bytes]:
    packets = []
    view = memoryview(body)
    pos = 0
    while pos < len(view):
        if pos + 2 > len(view):
            raise ValueError(f"the body ends inside the length of packet {len(packets)} (at byte {pos})")
        n = int.from_bytes(view[pos:pos + 2], "big")
        if not 1 <= n <= MAX_OPUS_PACKET:
            raise ValueError(f"packet {len(packets)} has length {n} (at byte {pos}); an Opus packet is "
                             f"1..{MAX_OPUS_PACKET} bytes")
        if pos + 2 + n > len(view):
            raise ValueError(f"packet {len(packets)} needs {n} bytes; the body has {len(view) - pos - 2} left")
        packets.append(bytes(view[pos + 2:pos + 2 + n]))
        pos += 2 + n
    return packets
