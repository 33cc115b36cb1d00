"""telecom.opus: the audio that comes out of the codec, checked against an independent one (opuslib)."""

from __future__ import annotations

import threading

import numpy as np
import opuslib
import pytest

from telecom.errors import CodecError, ConfigurationError
from telecom.opus import (
    CHANNELS,
    FRAME_BYTES,
    FRAME_SAMPLES,
    SAMPLE_RATE,
    SILENCE_FRAME,
    Decoder,
    Encoder,
    packet_samples,
)

TONE_HZ = 440.0
TONE_DBFS = -6.0


def stereo_tone(seconds: float, freq: float = TONE_HZ, dbfs: float = TONE_DBFS) -> np.ndarray:
    """(samples, 2) int16 sine; the right channel is a quarter period behind so the channels differ."""
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    amp = 32767 * 10 ** (dbfs / 20)
    left = amp * np.sin(2 * np.pi * freq * t)
    right = amp * np.sin(2 * np.pi * freq * t - np.pi / 2)
    return np.round(np.stack([left, right], axis=1)).astype(np.int16)


def frames_of(pcm: np.ndarray) -> list[bytes]:
    return [pcm[i : i + FRAME_SAMPLES].tobytes() for i in range(0, len(pcm) - FRAME_SAMPLES + 1, FRAME_SAMPLES)]


def as_stereo(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").reshape(-1, CHANNELS).astype(np.float64)


def peak_frequency(x: np.ndarray) -> float:
    """Hann-windowed FFT peak refined by parabolic interpolation of the log magnitude."""
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    k = int(np.argmax(spectrum[1:-1])) + 1
    a, b, c = np.log(spectrum[k - 1 : k + 2] + 1e-12)
    offset = 0.5 * (a - c) / (a - 2 * b + c)
    return (k + offset) * SAMPLE_RATE / len(x)


def rms_db(x: np.ndarray) -> float:
    return 20 * np.log10(np.sqrt(np.mean(np.square(x))) / 32768)


def assert_tone_survives(original: np.ndarray, decoded: np.ndarray) -> None:
    # Skip the codec delay and the encoder's start-up (first 40 ms) before measuring.
    steady = decoded[2 * FRAME_SAMPLES :]
    assert len(steady) >= SAMPLE_RATE // 2
    for ch in range(CHANNELS):
        assert peak_frequency(steady[:, ch]) == pytest.approx(TONE_HZ, abs=2.0)
        assert rms_db(steady[:, ch]) == pytest.approx(rms_db(original[:, ch].astype(np.float64)), abs=1.0)


@pytest.fixture(scope="module")
def tone() -> np.ndarray:
    return stereo_tone(1.2)


@pytest.fixture(scope="module")
def packets(tone) -> list[bytes]:
    enc = Encoder(bitrate=64000, complexity=10)
    return [enc.encode(f) for f in frames_of(tone)]


def test_constants_match_the_protocol():
    assert (SAMPLE_RATE, CHANNELS, FRAME_SAMPLES, FRAME_BYTES) == (48000, 2, 960, 3840)
    assert SILENCE_FRAME == b"\xf8\xff\xfe"


def test_round_trip_keeps_frequency_and_level(tone, packets):
    dec = Decoder()
    decoded = as_stereo(b"".join(dec.decode(p) for p in packets))
    assert len(decoded) == len(packets) * FRAME_SAMPLES
    assert_tone_survives(tone, decoded)


def test_independent_decoder_reads_our_packets(tone, packets):
    ref = opuslib.Decoder(SAMPLE_RATE, CHANNELS)
    decoded = as_stereo(b"".join(ref.decode(p, FRAME_SAMPLES) for p in packets))
    assert_tone_survives(tone, decoded)


def test_we_read_an_independent_encoders_packets(tone):
    ref = opuslib.Encoder(SAMPLE_RATE, CHANNELS, opuslib.APPLICATION_AUDIO)
    ref.bitrate = 64000
    theirs = [ref.encode(f, FRAME_SAMPLES) for f in frames_of(tone)]
    dec = Decoder()
    decoded = as_stereo(b"".join(dec.decode(p) for p in theirs))
    assert_tone_survives(tone, decoded)


def test_packets_are_20ms_and_match_the_bitrate(packets):
    assert all(packet_samples(p) == FRAME_SAMPLES for p in packets)
    kbps = sum(len(p) for p in packets) * 8 / (len(packets) * 0.020) / 1000
    assert 40 < kbps < 90  # 64 kbit/s VBR target


def test_encoder_accepts_any_contiguous_buffer(tone):
    frame = frames_of(tone)[5]
    a, b, c = Encoder(), Encoder(), Encoder()
    want = a.encode(frame)
    assert b.encode(memoryview(bytearray(frame))) == want
    # an odd offset into a larger buffer (misaligned int16s) must give the same packet
    assert c.encode(memoryview(b"\x00" + frame)[1:]) == want


def test_silence_frame_decodes_to_silence():
    assert packet_samples(SILENCE_FRAME) == FRAME_SAMPLES
    out = Decoder().decode(SILENCE_FRAME)
    assert len(out) == FRAME_BYTES
    assert np.max(np.abs(as_stereo(out))) <= 1


def test_plc_returns_a_full_frame_continuing_the_tone(packets):
    dec = Decoder()
    for p in packets[:30]:
        dec.decode(p)
    concealed = dec.decode(None)
    assert len(concealed) == FRAME_BYTES
    assert rms_db(as_stereo(concealed)) > TONE_DBFS - 3 - 10  # not silence: the tone is extrapolated
    assert len(dec.decode(None, frame_samples=480)) == 480 * CHANNELS * 2


def test_fec_recovers_a_lost_packet(tone):
    enc = Encoder(fec=True, expected_loss=15)
    assert enc.fec and enc.expected_loss == 15
    packets = [enc.encode(f) for f in frames_of(tone)]
    lost = 30
    reference = Decoder()
    expected = [as_stereo(reference.decode(p)) for p in packets[: lost + 1]][lost]

    with_fec, plc_only = Decoder(), Decoder()
    for p in packets[:lost]:
        with_fec.decode(p)
        plc_only.decode(p)
    recovered = as_stereo(with_fec.decode(packets[lost + 1], fec=True))
    concealed = as_stereo(plc_only.decode(None))

    assert recovered.shape == expected.shape
    assert rms_db(recovered) == pytest.approx(rms_db(tone[: FRAME_SAMPLES].astype(np.float64)), abs=1.0)
    fec_error = np.sqrt(np.mean((recovered - expected) ** 2))
    plc_error = np.sqrt(np.mean((concealed - expected) ** 2))
    # the FEC data carried by the next packet is used: far closer to the real frame than concealment
    assert fec_error < plc_error / 4
    # the stream goes on normally after the recovered frame
    assert len(with_fec.decode(packets[lost + 1])) == FRAME_BYTES


def test_fec_setting_defaults_the_expected_loss():
    enc = Encoder()
    assert not enc.fec
    enc.fec = True
    assert enc.expected_loss == 15  # libopus writes no FEC data at 0 % expected loss
    enc.expected_loss = 30
    enc.bitrate = 32000
    enc.complexity = 5
    assert (enc.expected_loss, enc.bitrate, enc.complexity) == (30, 32000, 5)
    assert len(enc.encode(bytes(FRAME_BYTES))) > 0


def test_wrong_frame_size_is_a_value_error():
    enc = Encoder()
    for size in (0, FRAME_BYTES - 2, FRAME_BYTES + 4, 2 * FRAME_BYTES):
        with pytest.raises(ValueError, match="3840 bytes"):
            enc.encode(bytes(size))
    with pytest.raises(TypeError):
        enc.encode("not pcm")


@pytest.mark.parametrize(
    "packet",
    [
        b"\xff\xff\xff\xff",  # code-3 TOC announcing 63 frames of 20 ms: longer than 120 ms
        b"\x03\x00",  # code-3 TOC with a frame count of 0
        b"\x03",  # code-3 TOC without its count byte
    ],
)
def test_garbage_packets_raise_codec_error(packet):
    dec = Decoder()
    with pytest.raises(CodecError) as info:
        dec.decode(packet)
    assert info.value.code is not None and info.value.code < 0
    assert isinstance(info.value, ValueError)
    with pytest.raises(CodecError):
        packet_samples(packet)
    # the decoder is still usable afterwards
    assert len(dec.decode(SILENCE_FRAME)) == FRAME_BYTES


def test_empty_packet_and_bad_settings_are_rejected():
    with pytest.raises(CodecError):
        Decoder().decode(b"")
    with pytest.raises(ValueError):
        Decoder().decode(None, frame_samples=100)  # not a multiple of 2.5 ms
    for kwargs in ({"bitrate": 10}, {"complexity": 11}, {"expected_loss": 101}, {"channels": 3},
                   {"sample_rate": 44100}, {"application": "music"}):
        with pytest.raises(ConfigurationError):
            Encoder(**kwargs)
    with pytest.raises(ConfigurationError):
        Decoder(channels=0)


def test_reset_makes_the_encoder_repeatable(tone):
    frames = frames_of(tone)[:5]
    enc = Encoder()
    first = [enc.encode(f) for f in frames]
    enc.reset()
    assert [enc.encode(f) for f in frames] == first


def test_encoders_in_threads_match_serial_results(tone):
    """Each thread owns its encoder; releasing the GIL must not mix up their states."""
    frames = frames_of(tone)[:25]
    enc = Encoder()
    expected = [enc.encode(f) for f in frames]
    results: dict[int, list[bytes]] = {}

    def work(i: int) -> None:
        e = Encoder()
        results[i] = [e.encode(f) for f in frames]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i] == expected for i in range(4))


def test_selfcheck_reports_a_surviving_tone():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "telecom.selfcheck"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "selfcheck passed" in out.stdout
    assert "aead_aes256_gcm_rtpsize" in out.stdout and "aead_xchacha20_poly1305_rtpsize" in out.stdout
    from telecom.opus import LIBOPUS_VERSION

    assert LIBOPUS_VERSION.startswith("libopus 1.") and f"opus library: {LIBOPUS_VERSION}\n" in out.stdout
