"""Opus-in-Ogg/WebM detection for passthrough: may a file's Opus packets go to the wire as they are?

What it owns: the rule that decides, from the container, the stream and its ``OpusHead``, whether a
source's packets can be sent without decoding, and the duration of an Opus packet from its TOC byte
(RFC 6716 §3.1). The packets themselves come from PyAV's ``container.demux(stream)``, which does not
decode.

The rule (anything else goes through the decode path, which always works):

* codec ``opus`` in an ``ogg`` or Matroska/WebM container, decoded rate 48 kHz;
* channel mapping family 0 (mono or stereo): Discord's receivers decode mono packets fine, so mono
  files pass through too; surround (family 1) is decoded and downmixed instead;
* output gain 0 dB: a non-zero header gain must be applied to the samples, so such files are decoded;
* every packet 20 ms (checked per packet; the engine sends one packet per 20 ms tick). A file whose
  first packets are not 20 ms is decoded; a packet of another duration later in a passthrough stream
  ends the track with a ``SourceError`` naming it (encoders keep the frame size constant).

Pre-skip is *not* applied in passthrough: the first packet's ``pre_skip`` samples (typically 312, 6.5 ms
of encoder start-up, near silence) are heard. The decode path honours pre-skip (FFmpeg applies it).

What it must not do: decode, or touch the network.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

# Frame duration in units of 2.5 ms by TOC config (RFC 6716 §3.1, Table 2).
_SILK_MS = (10.0, 20.0, 40.0, 60.0)
_HYBRID_MS = (10.0, 20.0)
_CELT_MS = (2.5, 5.0, 10.0, 20.0)


def opus_packet_ms(packet: bytes) -> float:
    """Duration of an Opus packet in milliseconds from its TOC (and frame-count) byte."""
    if not packet:
        raise ValueError("empty Opus packet")
    toc = packet[0]
    config = toc >> 3
    if config < 12:
        frame_ms = _SILK_MS[config % 4]
    elif config < 16:
        frame_ms = _HYBRID_MS[config % 2]
    else:
        frame_ms = _CELT_MS[config % 4]
    code = toc & 0x03
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    else:
        if len(packet) < 2:
            raise ValueError("Opus code-3 packet without its frame count byte")
        frames = packet[1] & 0x3F
    return frame_ms * frames


@dataclass(frozen=True)
class OpusHead:
    """The fields of an ``OpusHead`` identification header (RFC 7845 §5.1) that passthrough needs."""

    channels: int
    pre_skip: int
    input_rate: int
    output_gain_q8: int
    mapping_family: int

    @classmethod
    def parse(cls, data: bytes) -> "OpusHead":
        if len(data) < 19 or data[:8] != b"OpusHead":
            raise ValueError("not an OpusHead header")
        _version, channels, pre_skip, rate, gain, family = struct.unpack_from("<BBHIhB", data, 8)
        return cls(channels, pre_skip, rate, gain, family)


def passthrough_refusal(container: Any, stream: Any) -> str | None:
    """``None`` when the stream's packets may pass through, else why not (for logs and stats)."""
    codec = stream.codec_context
    if codec.name != "opus":
        return f"codec is {codec.name}, not opus"
    formats = set(container.format.name.split(","))
    if not formats & {"ogg", "matroska", "webm"}:
        return f"container {container.format.name} is not Ogg or Matroska/WebM"
    if codec.sample_rate != 48000:
        return f"decoded rate {codec.sample_rate} Hz, not 48 kHz"
    extradata = codec.extradata or b""
    try:
        head = OpusHead.parse(bytes(extradata))
    except ValueError:
        return "no OpusHead in the stream header"
    if head.mapping_family != 0 or head.channels not in (1, 2):
        return f"channel mapping family {head.mapping_family} with {head.channels} channels"
    if head.output_gain_q8 != 0:
        return f"output gain {head.output_gain_q8 / 256:.2f} dB must be applied"
    return None
