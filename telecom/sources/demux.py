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
* every packet made of 20 ms frames (checked per packet; the engine sends one 20 ms frame per tick). A
  packet of several 20 ms frames (40 or 60 ms of CELT, as ``opusenc --framesize 60`` writes) is split
  into one packet per frame without decoding (:func:`split_to_20ms`). A file whose first packet has
  frames of another duration is decoded; from such a packet later in a passthrough stream, the decode
  thread re-encodes into 20 ms packets until the frames realign (``decode._Reframer``).

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


def _frame_ms(toc: int) -> float:
    config = toc >> 3
    if config < 12:
        return _SILK_MS[config % 4]
    if config < 16:
        return _HYBRID_MS[config % 2]
    return _CELT_MS[config % 4]


def _frame_length(packet: bytes, pos: int) -> tuple[int, int]:
    """A frame length coded in one or two bytes at ``pos`` (RFC 6716 §3.2.1): (length, next pos)."""
    if pos >= len(packet):
        raise ValueError("Opus packet truncated in a frame length")
    first = packet[pos]
    if first < 252:
        return first, pos + 1
    if pos + 1 >= len(packet):
        raise ValueError("Opus packet truncated in a frame length")
    return first + 4 * packet[pos + 1], pos + 2


def opus_frames(packet: bytes) -> list[bytes]:
    """The compressed frames of an Opus packet, for any frame-count code (RFC 6716 §3.2); ValueError
    on a malformed packet."""
    if not packet:
        raise ValueError("empty Opus packet")
    code = packet[0] & 0x03
    body = packet[1:]
    if code == 0:
        return [bytes(body)]
    if code == 1:
        if len(body) % 2:
            raise ValueError("Opus code-1 packet with an odd payload length")
        half = len(body) // 2
        return [bytes(body[:half]), bytes(body[half:])]
    if code == 2:
        size, pos = _frame_length(packet, 1)
        if pos + size > len(packet):
            raise ValueError("Opus code-2 packet shorter than its first frame")
        return [bytes(packet[pos:pos + size]), bytes(packet[pos + size:])]
    if len(packet) < 2:
        raise ValueError("Opus code-3 packet without its frame count byte")
    count, vbr, padded = packet[1] & 0x3F, packet[1] & 0x80, packet[1] & 0x40
    if count == 0:
        raise ValueError("Opus code-3 packet with zero frames")
    pos, padding = 2, 0
    if padded:
        while True:
            if pos >= len(packet):
                raise ValueError("Opus packet truncated in its padding length")
            byte = packet[pos]
            pos += 1
            padding += 254 if byte == 255 else byte
            if byte != 255:
                break
    end = len(packet) - padding
    if vbr:
        sizes = []
        for _ in range(count - 1):
            size, pos = _frame_length(packet, pos)
            sizes.append(size)
        sizes.append(end - pos - sum(sizes))
    else:
        if (end - pos) < 0 or (end - pos) % count:
            raise ValueError("Opus code-3 CBR packet whose payload does not split evenly")
        sizes = [(end - pos) // count] * count
    if end < pos or any(size < 0 for size in sizes) or pos + sum(sizes) != end:
        raise ValueError("Opus code-3 packet whose frame lengths do not add up")
    frames = []
    for size in sizes:
        frames.append(bytes(packet[pos:pos + size]))
        pos += size
    return frames


def split_to_20ms(packet: bytes) -> list[bytes] | None:
    """A packet of several 20 ms frames (e.g. 40 or 60 ms of CELT) as one single-frame packet per
    frame, losslessly: the same TOC configuration with frame-count code 0 (RFC 6716 §3.2.2). None
    when its frames are not 20 ms each (a 40/60 ms SILK frame, 10 ms frames): those must be decoded."""
    if not packet or _frame_ms(packet[0]) != 20.0:
        return None
    toc = bytes([packet[0] & 0xFC])
    return [toc + frame for frame in opus_frames(packet)]


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
