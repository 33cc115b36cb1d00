"""Signal measurements shared by the audio tests: tones, their frequency and level."""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 48000


def stereo_tone(seconds: float, freq: float, dbfs: float = -6.0) -> bytes:
    """s16le stereo sine (both channels equal) at ``dbfs`` peak level."""
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    mono = np.round(32767 * 10 ** (dbfs / 20) * np.sin(2 * np.pi * freq * t)).astype("<i2")
    return np.repeat(mono, 2).tobytes()


def left_channel(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").reshape(-1, 2)[:, 0].astype(np.float64)


def peak_frequency(x: np.ndarray) -> float:
    """Hann-windowed FFT peak refined by parabolic interpolation of the log magnitude."""
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    k = int(np.argmax(spectrum[1:-1])) + 1
    a, b, c = np.log(spectrum[k - 1 : k + 2] + 1e-12)
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * SAMPLE_RATE / len(x)


def rms_db(x: np.ndarray) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(np.square(x))) / 32768 + 1e-12))


def active_part(x: np.ndarray, threshold: float = 200.0, margin: int = 4800) -> np.ndarray:
    """The samples between the first and last loud sample, minus ``margin`` on each side
    (skips codec start-up and the fade into the silence tail)."""
    loud = np.flatnonzero(np.abs(x) > threshold)
    if len(loud) == 0:
        return x[:0]
    return x[loud[0] + margin : loud[-1] - margin]


def tone_share(audio: bytes | np.ndarray, freq: float, width: float = 20.0) -> float:
    """The share of the energy within ``width`` Hz of ``freq`` (0 for silence) of s16le stereo bytes'
    left channel, or of mono samples: a tone puts nearly all of it there, noise almost none. Safer than
    "the peak is not at freq" for asking whether a tone is absent: the peak of loud noise can land near
    ``freq`` by chance."""
    x = left_channel(audio) if isinstance(audio, (bytes, bytearray)) else np.asarray(audio, dtype=np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2 if len(x) else np.zeros(1)
    total = spectrum.sum()
    if total == 0:
        return 0.0
    f = np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE)
    return float(spectrum[np.abs(f - freq) <= width].sum() / total)
