"""``python -m telecom.selfcheck``: does this installation produce audio that survives the wire?

Builds one second of a 440 Hz stereo tone at -6 dBFS, encodes it with telecom's Opus encoder, seals
every packet with :class:`telecom.aead.TransportCipher` in both rtpsize modes, opens it again, decodes
it and measures what came out: the tone's frequency (FFT peak with parabolic interpolation) and its
level change, plus the time per encode and per seal. Exits 1 when the tone does not survive
(frequency off by more than 2 Hz, level by more than 1 dB) or a packet does not open to what was
sealed, 0 otherwise. Uses numpy for the FFT when it is installed and a small pure-Python FFT when not.

This module only checks; it owns no protocol logic.
"""

from __future__ import annotations

import cmath
import math
import struct
import sys
import time

TONE_HZ = 440.0
TONE_DBFS = -6.0
SECONDS = 1.0
FREQ_TOLERANCE_HZ = 2.0
LEVEL_TOLERANCE_DB = 1.0


def _tone(sample_rate: int, seconds: float) -> bytes:
    amp = 32767 * 10 ** (TONE_DBFS / 20)
    n = int(sample_rate * seconds)
    w = 2 * math.pi * TONE_HZ / sample_rate
    return b"".join(struct.pack("<hh", s, s) for s in (round(amp * math.sin(w * i)) for i in range(n)))


def _left(pcm: bytes) -> list[float]:
    return [float(v) for v in struct.unpack(f"<{len(pcm) // 2}h", pcm)[0::2]]


def _fft_magnitudes(x: list[float]) -> list[float]:
    """|rfft| of a power-of-two length signal (iterative radix-2; only used without numpy)."""
    n = len(x)
    a = [complex(v) for v in x]
    j = 0
    for i in range(1, n):  # bit-reversal permutation
        bit = n >> 1
        while j & bit:
            j ^= bit
            bit >>= 1
        j |= bit
        if i < j:
            a[i], a[j] = a[j], a[i]
    size = 2
    while size <= n:
        half = size // 2
        step = cmath.exp(-2j * math.pi / size)
        for start in range(0, n, size):
            w = 1 + 0j
            for k in range(start, start + half):
                t = w * a[k + half]
                a[k + half] = a[k] - t
                a[k] = a[k] + t
                w *= step
        size *= 2
    return [abs(v) for v in a[: n // 2 + 1]]


def peak_frequency(x: list[float], sample_rate: int) -> float:
    """Hann-windowed FFT peak, refined by a parabola through the log magnitudes around it."""
    n = 1 << (len(x).bit_length() - 1)  # largest power of two that fits
    x = x[:n]
    window = [0.5 - 0.5 * math.cos(2 * math.pi * i / (n - 1)) for i in range(n)]
    try:
        import numpy as np

        mags = list(np.abs(np.fft.rfft(np.asarray(x) * np.asarray(window))))
    except ImportError:
        mags = _fft_magnitudes([v * w for v, w in zip(x, window)])
    k = max(range(1, len(mags) - 1), key=mags.__getitem__)
    a, b, c = (math.log(mags[i] + 1e-12) for i in (k - 1, k, k + 1))
    offset = 0.5 * (a - c) / (a - 2 * b + c)
    return (k + offset) * sample_rate / n


def rms_db(x: list[float]) -> float:
    return 20 * math.log10(math.sqrt(sum(v * v for v in x) / len(x)) / 32768)


def main() -> int:
    from telecom.opus import FRAME_BYTES, FRAME_SAMPLES, LIBOPUS_VERSION, SAMPLE_RATE, Decoder, Encoder

    # Which libopus the extensions were linked with: scripts/bootstrap builds 1.5.2 for this CPU, a
    # plain ``pip install`` links the system's (README, "Installing as a library").
    print(f"opus library: {LIBOPUS_VERSION}")
    ok = True
    pcm = _tone(SAMPLE_RATE, SECONDS)
    frames = [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]

    encoder = Encoder(bitrate=64000, complexity=10)
    t0 = time.perf_counter()
    packets = [encoder.encode(f) for f in frames]
    encode_us = (time.perf_counter() - t0) / len(frames) * 1e6
    print(f"opus encode: {len(packets)} frames, {encode_us:.1f} µs per 20 ms frame "
          f"({sum(map(len, packets)) * 8 / SECONDS / 1000:.1f} kbit/s)")

    received = {"no transport encryption": packets}
    try:
        from telecom.aead import SUPPORTED_MODES, TransportCipher
        from telecom.rtp import pack_header
    except ImportError as exc:
        print(f"transport sealing SKIPPED: telecom.aead/telecom.rtp not importable ({exc})")
    else:
        key = bytes(range(32))
        ssrc = 0x1234ABCD
        for mode in SUPPORTED_MODES:
            cipher = TransportCipher(mode, key)
            headers = [pack_header(seq, seq * FRAME_SAMPLES, ssrc) for seq in range(len(packets))]
            cipher.seal(headers[0], packets[0], 0)  # warm up (library initialisation, caches)
            t0 = time.perf_counter()
            sealed = [cipher.seal(h, p, counter) for counter, (h, p) in enumerate(zip(headers, packets))]
            seal_us = (time.perf_counter() - t0) / len(packets) * 1e6
            opened = [cipher.open(s).payload for s in sealed]
            intact = opened == packets
            ok &= intact
            print(f"{mode}: {seal_us:.2f} µs per seal, "
                  f"{'all packets open to what was sealed' if intact else 'PAYLOAD MISMATCH'}")
            received[mode] = opened

    reference_left = _left(pcm)
    want_db = rms_db(reference_left)
    for path, payloads in received.items():
        decoder = Decoder()
        out = b"".join(decoder.decode(p) for p in payloads)
        left = _left(out)[2 * FRAME_SAMPLES :]  # skip the codec delay and start-up
        freq = peak_frequency(left, SAMPLE_RATE)
        change = rms_db(left) - want_db
        good = abs(freq - TONE_HZ) <= FREQ_TOLERANCE_HZ and abs(change) <= LEVEL_TOLERANCE_DB
        ok &= good
        print(f"decoded ({path}): {freq:.2f} Hz (sent {TONE_HZ:.0f} Hz), level {change:+.2f} dB "
              f"-> {'OK' if good else 'FAIL'}")

    print("selfcheck", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
