"""Volume and mixing of s16le stereo PCM (48 kHz, interleaved), for callers and the media engine.

Picks the compiled implementation (:mod:`telecom._fast.mixer`) unless ``TELECOM_NO_EXTENSIONS=1``,
then the pure-Python twin (:mod:`telecom._twin.mixer`); both give bit-identical results.
``IMPLEMENTATION`` says which one is in use ("fast" or "twin").

>>> from telecom.mixer import mix, apply_volume
>>> apply_volume(b"\\x10\\x00\\x10\\x00", 50)
b'\\x08\\x00\\x08\\x00'
"""

from __future__ import annotations

from telecom._fast import NO_EXTENSIONS, load

if NO_EXTENSIONS:
    from telecom._twin import mixer as _impl

    IMPLEMENTATION = "twin"
else:
    _impl = load("mixer")
    IMPLEMENTATION = "fast"

SAMPLE_RATE: int = _impl.SAMPLE_RATE
CHANNELS: int = _impl.CHANNELS
RAMP_FRAMES: int = _impl.RAMP_FRAMES

gain_for_percent = _impl.gain_for_percent
apply_volume = _impl.apply_volume
mix = _impl.mix
GainRamp = _impl.GainRamp

__all__ = [
    "IMPLEMENTATION",
    "SAMPLE_RATE",
    "CHANNELS",
    "RAMP_FRAMES",
    "gain_for_percent",
    "apply_volume",
    "mix",
    "GainRamp",
]
