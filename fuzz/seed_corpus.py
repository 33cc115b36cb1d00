"""Write the seed inputs of the wire corpus (valid packets of every shape the parsers know).

    .venv/bin/python fuzz/seed_corpus.py fuzz/corpus/wire

Seeds are built with the pure-Python twin so they do not depend on the code under test.
"""

import hashlib
import pathlib
import struct
import sys

from telecom._twin import aead, rtp


def seeds() -> list[bytes]:
    out = [b"", b"\x80", b"\x80\x78" + b"\x00" * 10]
    out.append(rtp.pack_header(1, 960, 42))
    out.append(rtp.RtpHeader(7, 7 * 960, 9, csrcs=[1, 2, 3]).pack() + b"payload")
    ext = rtp.RtpHeader(8, 8 * 960, 9, extension_profile=0xBEDE, extension_length=2).pack()
    out.append(ext + bytes([0x10, 0xAA, 0x21, 0xBB, 0xCC, 0, 0, 0]) + b"opus")
    pad = bytearray(rtp.RtpHeader(9, 9 * 960, 9, padding=True).pack() + b"data" + b"\x00\x00\x03")
    out.append(bytes(pad))
    out.append(bytes([0x81, 200]) + struct.pack(">H", 6) + b"\x00" * 24)  # RTCP sender report
    out.append(bytes([0x80, 201]) + struct.pack(">H", 1) + b"\x00" * 4)   # RTCP receiver report
    for mode in (aead.AES256_GCM_RTPSIZE, aead.XCHACHA20_POLY1305_RTPSIZE):
        c = aead.TransportCipher(mode, bytes(range(32)))
        out.append(c.seal(rtp.pack_header(5, 4800, 77), b"\xfc" + b"\x11" * 40, 5))
        out.append(c.seal(ext, bytes([0x10, 0xAA, 0x21, 0xBB, 0xCC, 0, 0, 0]) + b"\xfc\x01", 6))
    return out


def main(dest: str) -> None:
    d = pathlib.Path(dest)
    d.mkdir(parents=True, exist_ok=True)
    for data in seeds():
        (d / hashlib.sha1(data).hexdigest()).write_bytes(data)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fuzz/corpus/wire")
