"""RTP headers for Discord voice: pack/parse, RTP/RTCP demultiplexing, wrap-around arithmetic.

Picks the compiled implementation (:mod:`telecom._fast.rtp`) unless ``TELECOM_NO_EXTENSIONS=1``,
then the pure-Python twin (:mod:`telecom._twin.rtp`); both have the same API and the same errors.
``IMPLEMENTATION`` says which one is in use ("fast" or "twin").

>>> from telecom.rtp import pack_header, parse_header, seq_add
>>> parse_header(pack_header(seq_add(65535, 1), 960, 42)).sequence
0
"""

from __future__ import annotations

from telecom._fast import NO_EXTENSIONS, load

if NO_EXTENSIONS:
    from telecom._twin import rtp as _impl

    IMPLEMENTATION = "twin"
else:
    _impl = load("rtp")
    IMPLEMENTATION = "fast"

RtpHeader = _impl.RtpHeader
PacketKind = _impl.PacketKind
parse_header = _impl.parse_header
pack_header = _impl.pack_header
classify = _impl.classify
seq_add = _impl.seq_add
seq_diff = _impl.seq_diff
ts_add = _impl.ts_add
ts_diff = _impl.ts_diff
counter_next = _impl.counter_next
parse_extension_elements = _impl.parse_extension_elements
strip_padding = _impl.strip_padding

__all__ = [
    "IMPLEMENTATION",
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
