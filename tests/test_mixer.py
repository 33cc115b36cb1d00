"""telecom.mixer: both implementations (compiled and twin) against an exact reference and the signal."""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telecom._fast import load
from telecom._twin import mixer as twin_mixer
from telecom.errors import ConfigurationError

fast_mixer = load("mixer")
IMPLEMENTATIONS = {"fast": fast_mixer, "twin": twin_mixer}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def mixer(request):
    return IMPLEMENTATIONS[request.param]


# ---- exact reference (the specification, written with numpy's float32 and Python's round) ---------


def ref_gain(percent: float) -> float:
    # the gain travels as a C float, then the product is taken in double precision
    return float(np.float32(percent / 100.0))


def reference_mix(frames: list[bytes], percents: list[float]) -> bytes:
    decoded = [struct.unpack(f"<{len(f) // 2}h", f) for f in frames]
    longest = max((len(d) for d in decoded), default=0)
    out = []
    for i in range(longest):
        total = sum(round(d[i] * ref_gain(p)) for d, p in zip(decoded, percents) if i < len(d))
        out.append(max(-32768, min(32767, total)))
    return struct.pack(f"<{len(out)}h", *out)


def pcm(samples) -> bytes:
    return struct.pack(f"<{len(samples)}h", *samples)


def stereo_tone(seconds: float = 0.5, freq: float = 440.0, dbfs: float = -6.0) -> bytes:
    n = int(seconds * 48000)
    t = np.arange(n) / 48000
    x = np.round(32767 * 10 ** (dbfs / 20) * np.sin(2 * np.pi * freq * t))
    return np.repeat(x[:, None], 2, axis=1).astype("<i2").tobytes()


def samples_of(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.int64)


def rms_db(data: bytes) -> float:
    x = samples_of(data).astype(np.float64)
    return 20 * math.log10(math.sqrt(np.mean(x * x)))


stereo_buffers = st.integers(min_value=0, max_value=120).flatmap(
    lambda frames: st.lists(
        st.integers(min_value=-32768, max_value=32767), min_size=2 * frames, max_size=2 * frames
    ).map(pcm)
)
volumes = st.floats(min_value=0.0, max_value=200.0, allow_nan=False)


# ---- sums and volumes -----------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(stereo_buffers, volumes), max_size=5))
def test_mix_matches_the_exact_reference(sources):
    frames = [f for f, _ in sources]
    percents = [p for _, p in sources]
    want = reference_mix(frames, percents)
    assert fast_mixer.mix(frames, percents) == want
    assert twin_mixer.mix(frames, percents) == want


@settings(max_examples=100, deadline=None)
@given(stereo_buffers, volumes)
def test_apply_volume_matches_the_exact_reference(buf, percent):
    want = reference_mix([buf], [percent])
    assert fast_mixer.apply_volume(buf, percent) == want
    assert twin_mixer.apply_volume(buf, percent) == want


def test_mix_without_volumes_is_a_plain_sum(mixer):
    a = pcm([1000, -2000, 3, 4])
    b = pcm([-1000, 500, 7, -4])
    assert mixer.mix([a, b]) == pcm([0, -1500, 10, 0])
    assert mixer.mix([]) == b""
    assert mixer.mix([a]) == a


def test_mix_saturates_at_int16_limits(mixer):
    loud = pcm([30000, -30000, 32767, -32768])
    assert mixer.mix([loud, loud]) == pcm([32767, -32768, 32767, -32768])
    assert mixer.mix([loud, loud, loud], [100, 100, 50]) == pcm([32767, -32768, 32767, -32768])
    # exactly at the limits nothing clips
    assert mixer.mix([pcm([32767, -32768]), pcm([0, 0])]) == pcm([32767, -32768])


def test_shorter_sources_are_silence_after_their_end(mixer):
    long = pcm([100] * 8)
    short = pcm([1] * 4)
    assert mixer.mix([short, long]) == pcm([101] * 4 + [100] * 4)


def test_half_volume_is_minus_6_02_db(mixer):
    tone = stereo_tone()
    assert rms_db(mixer.apply_volume(tone, 50)) - rms_db(tone) == pytest.approx(-6.02, abs=0.1)
    assert rms_db(mixer.mix([tone], [50])) - rms_db(tone) == pytest.approx(-6.02, abs=0.1)


def test_zero_volume_is_silence(mixer):
    tone = stereo_tone(0.1)
    assert mixer.apply_volume(tone, 0) == bytes(len(tone))
    assert mixer.mix([tone, tone], [0, 0]) == bytes(len(tone))


def test_double_volume_of_a_loud_tone_saturates(mixer):
    tone = stereo_tone(0.1, dbfs=-1.0)
    out = samples_of(mixer.apply_volume(tone, 200))
    assert out.max() == 32767 and out.min() == -32768
    assert np.count_nonzero(np.abs(out) >= 32767) > len(out) // 4
    # unclipped samples are exactly doubled
    src = samples_of(tone)
    small = np.abs(src) < 16000
    assert np.array_equal(out[small], 2 * src[small])


def test_invalid_volumes_and_buffers_are_rejected(mixer):
    assert mixer.gain_for_percent(100) == 1.0
    assert mixer.gain_for_percent(0) == 0.0
    assert mixer.gain_for_percent(200) == 2.0
    for bad in (-0.1, 200.5, float("nan"), float("inf")):
        with pytest.raises(ConfigurationError):
            mixer.gain_for_percent(bad)
        with pytest.raises(ConfigurationError):
            mixer.apply_volume(bytes(4), bad)
        with pytest.raises(ConfigurationError):
            mixer.GainRamp(bad)
    with pytest.raises(ValueError):
        mixer.apply_volume(bytes(6), 50)  # not whole stereo sample-frames
    with pytest.raises(ValueError):
        mixer.mix([bytes(4), bytes(4)], [100])  # volumes do not match the sources


# ---- gain ramps -----------------------------------------------------------------------------------


def test_ramp_has_no_step_and_reaches_the_target(mixer):
    dc = pcm([10000] * 2 * 960)
    ramp = mixer.GainRamp(100)
    ramp.set_target(50)
    out = samples_of(ramp.process(dc))
    left = out[0::2]
    assert left[0] == 10000  # starts where the gain was
    jumps = np.abs(np.diff(left))
    assert jumps.max() <= math.ceil(10000 * 0.5 / mixer.RAMP_FRAMES) + 1
    assert np.all(np.diff(left[: mixer.RAMP_FRAMES + 1]) <= 0)  # monotonic fade
    assert np.all(left[mixer.RAMP_FRAMES :] == 5000)  # then constant at the target
    assert not ramp.ramping and ramp.gain == 0.5
    assert ramp.process(dc) == mixer.apply_volume(dc, 50)


def test_ramp_on_a_tone_stays_smooth(mixer):
    tone = stereo_tone(0.06)
    natural = np.abs(np.diff(samples_of(tone)[0::2])).max()
    ramp = mixer.GainRamp(100)
    ramp.set_target(0)
    out = samples_of(ramp.process(tone))[0::2]
    # an abrupt mute would jump by up to the tone's amplitude (~16400); the ramp adds at most A/240
    assert np.abs(np.diff(out)).max() <= natural + 16422 / mixer.RAMP_FRAMES + 2
    assert np.all(out[mixer.RAMP_FRAMES :] == 0)


def test_ramp_does_not_depend_on_buffer_sizes(mixer):
    dc = pcm([20000, -20000] * 600)
    whole = mixer.GainRamp(30)
    whole.set_target(170)
    pieces = mixer.GainRamp(30)
    pieces.set_target(170)
    chunk = 4 * 7  # 7 sample-frames at a time
    joined = b"".join(pieces.process(dc[i : i + chunk]) for i in range(0, len(dc), chunk))
    diff = np.abs(samples_of(whole.process(dc)) - samples_of(joined))
    assert diff.max() <= 1  # same line, up to the rounding of the split points


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(volumes, stereo_buffers), max_size=8), volumes)
def test_ramp_fast_matches_twin(steps, start):
    a, b = fast_mixer.GainRamp(start), twin_mixer.GainRamp(start)
    for step in steps:
        if isinstance(step, float):
            a.set_target(step)
            b.set_target(step)
        else:
            assert a.process(step) == b.process(step)
        assert (a.gain, a.target_gain, a.ramping) == (b.gain, b.target_gain, b.ramping)


def test_selector_honours_no_extensions():
    code = "import telecom.mixer as m; print(m.IMPLEMENTATION, m.mix.__module__)"
    env = dict(os.environ, TELECOM_NO_EXTENSIONS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["twin", "telecom._twin.mixer"]
    env["TELECOM_NO_EXTENSIONS"] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "fast"
