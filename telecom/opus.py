"""Opus encoding and decoding for Discord voice: 48 kHz, stereo, 20 ms frames of s16le PCM.

Public face of the compiled codec in :mod:`telecom._fast.opus` (libopus underneath). There is no
pure-Python twin: an Opus codec in Python would be neither fast nor a useful oracle, and the tests
check it against an independent decoder (opuslib) instead.

>>> from telecom.opus import Encoder, Decoder, FRAME_BYTES
>>> packet = Encoder().encode(bytes(FRAME_BYTES))
>>> len(Decoder().decode(packet)) == FRAME_BYTES
True
"""

from __future__ import annotations

from telecom._fast import load

_opus = load("opus")

SAMPLE_RATE: int = _opus.SAMPLE_RATE
CHANNELS: int = _opus.CHANNELS
FRAME_SAMPLES: int = _opus.FRAME_SAMPLES
FRAME_BYTES: int = _opus.FRAME_BYTES
SILENCE_FRAME: bytes = _opus.SILENCE_FRAME
MAX_PACKET_BYTES: int = _opus.MAX_PACKET_BYTES
DEFAULT_FEC_LOSS: int = _opus.DEFAULT_FEC_LOSS
LIBOPUS_VERSION: str = _opus.LIBOPUS_VERSION

Encoder = _opus.Encoder
Decoder = _opus.Decoder
packet_samples = _opus.packet_samples

__all__ = [
    "SAMPLE_RATE",
    "CHANNELS",
    "FRAME_SAMPLES",
    "FRAME_BYTES",
    "SILENCE_FRAME",
    "MAX_PACKET_BYTES",
    "DEFAULT_FEC_LOSS",
    "LIBOPUS_VERSION",
    "Encoder",
    "Decoder",
    "packet_samples",
]
