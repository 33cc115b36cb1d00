"""Jitter buffer: every behaviour test runs against the compiled module and the pure-Python twin (the
``jitter`` fixture), and a hypothesis test feeds both the same random arrival patterns and requires
identical results at every step."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telecom._fast import load
from telecom._twin import jitter as twin_jitter
from telecom.errors import ConfigurationError

IMPLEMENTATIONS = {"fast": lambda: load("jitter"), "twin": lambda: twin_jitter}
SILENCE = b"\xf8\xff\xfe"


@pytest.fixture(params=sorted(IMPLEMENTATIONS), scope="module")
def jitter(request):
    return IMPLEMENTATIONS[request.param]()


def payload(seq: int) -> bytes:
    return b"opus" + seq.to_bytes(2, "big")


def drain(jb, ticks: int) -> list:
    return [jb.pop() for _ in range(ticks)]


def frames(pops) -> list[int]:
    return [p.seq for p in pops if p.kind == "frame"]


def test_in_order_stream_plays_every_packet_after_the_prefill(jitter):
    jb = jitter.JitterBuffer(depth=3)
    out = []
    for i in range(20):
        assert jb.push(100 + i, 960 * i, payload(100 + i), arrival_ns=i * 20_000_000) == "accepted"
        out.append(jb.pop())
    out += drain(jb, 5)
    kinds = [p.kind for p in out]
    assert kinds[:2] == ["none", "none"]        # prefill of 3 packets
    assert frames(out) == list(range(100, 120))
    assert out[2].spurt_start and not out[3].spurt_start
    assert all(p.payload == payload(p.seq) for p in out if p.kind == "frame")
    # Frames sit on the arrival clock: 20 ms apart, starting at the first packet's arrival.
    times = [p.time_ns for p in out if p.kind == "frame"]
    assert times[0] == 0 and all(b - a == 20_000_000 for a, b in zip(times, times[1:]))


@pytest.mark.parametrize("depth", [2, 3, 5])
def test_reorder_within_depth_is_undone(jitter, depth):
    jb = jitter.JitterBuffer(depth=depth)
    seqs = list(range(50))
    rng = random.Random(depth)
    # swap neighbours: every packet arrives at most one tick late, which a depth >= 2 absorbs
    for i in range(0, 48, 3):
        if rng.random() < 0.7:
            seqs[i], seqs[i + 1] = seqs[i + 1], seqs[i]
    out = []
    for s in seqs:
        jb.push(s, 960 * s, payload(s))
        out.append(jb.pop())
    for s in (SILENCE,):
        jb.push(50, 960 * 50, s)
    out += drain(jb, depth + 3)
    assert frames(out) == list(range(51))
    assert jb.stats()["late"] == 0 and jb.stats()["lost"] == 0
    assert out[-1].kind in ("end", "none") and "end" in [p.kind for p in out]


def test_duplicates_are_dropped_before_and_after_playing(jitter):
    jb = jitter.JitterBuffer(depth=2)
    assert jb.push(10, 0, payload(10)) == "accepted"
    assert jb.push(10, 0, payload(10)) == "duplicate"       # still buffered
    jb.push(11, 960, payload(11))
    assert frames(drain(jb, 1)) == [10]
    assert jb.push(10, 0, payload(10)) == "duplicate"       # already played
    assert frames(drain(jb, 1)) == [11]
    assert jb.stats()["duplicates"] == 2 and jb.stats()["late"] == 0


def test_sequence_wraps_from_65535_to_0(jitter):
    jb = jitter.JitterBuffer(depth=2)
    seqs = [65533, 65534, 65535, 0, 1, 2]
    order = [65534, 65533, 0, 65535, 2, 1]
    out = []
    for s in order:
        assert jb.push(s, (seqs.index(s) * 960) & 0xFFFFFFFF, payload(s)) == "accepted"
        out.append(jb.pop())
    out += drain(jb, 3)
    assert frames(out) == seqs
    assert jb.stats()["late"] == 0 and jb.stats()["resets"] == 0


def test_timestamp_wrap_keeps_frames_20_ms_apart(jitter):
    jb = jitter.JitterBuffer(depth=1)
    ts0 = 2**32 - 2 * 960
    out = []
    for i in range(5):
        jb.push(i, (ts0 + 960 * i) & 0xFFFFFFFF, payload(i), arrival_ns=1_000_000_000 + i * 20_000_000)
        out.append(jb.pop())
    times = [p.time_ns for p in out if p.kind == "frame"]
    assert [p.timestamp for p in out] == [(ts0 + 960 * i) & 0xFFFFFFFF for i in range(5)]
    assert times == [1_000_000_000 + i * 20_000_000 for i in range(5)]


def test_late_packets_are_counted_and_dropped(jitter):
    jb = jitter.JitterBuffer(depth=1)
    jb.push(0, 0, payload(0))
    jb.push(2, 1920, payload(2))
    out = drain(jb, 2)
    assert [p.kind for p in out] == ["frame", "lost"]
    assert out[1].fec == payload(2)      # the next packet is offered for in-band FEC
    assert jb.push(1, 960, payload(1)) == "late"
    assert frames(drain(jb, 1)) == [2]
    st = jb.stats()
    assert st["late"] == 1 and st["lost"] == 1


def test_adaptive_depth_grows_on_late_packets(jitter):
    jb = jitter.JitterBuffer(depth=2, adaptive=True, min_depth=2, max_depth=6)
    jb.push(0, 0, payload(0))
    jb.push(2, 1920, payload(2))
    drain(jb, 3)
    for late in (1, 1, 1):
        jb.push(late, 960, payload(late))
    assert jb.depth == 5
    assert jitter.JitterBuffer(depth=2).depth == 2


def test_spurt_ends_after_silence_tail_and_next_spurt_is_placed_by_arrival(jitter):
    jb = jitter.JitterBuffer(depth=1)
    out = []
    for i in range(5):
        jb.push(i, 960 * i, payload(i) if i < 3 else SILENCE, arrival_ns=i * 20_000_000)
        out.append(jb.pop())
    out += drain(jb, 3)
    assert [p.kind for p in out[5:]] == ["end", "none", "none"]
    # second spurt: sequence continues, timestamp jumped by the pause (1 s), arrives 1 s later
    jb.push(5, 960 * 5 + 48000, payload(5), arrival_ns=1_100_000_000)
    p = jb.pop()
    assert p.kind == "frame" and p.spurt_start and p.time_ns == 1_100_000_000


def test_sender_vanishing_mid_spurt_is_concealed_then_ended(jitter):
    jb = jitter.JitterBuffer(depth=1)
    jb.push(0, 0, payload(0))
    out = drain(jb, 1 + jitter.MAX_CONCEAL + 2)
    assert [p.kind for p in out] == ["frame"] + ["lost"] * jitter.MAX_CONCEAL + ["end", "none"]


def test_jump_beyond_window_resets(jitter):
    jb = jitter.JitterBuffer(depth=1)
    jb.push(0, 0, payload(0))
    assert jb.push(1000, 960_000, payload(1000)) == "reset"
    assert jb.stats()["resets"] == 1
    assert jb.pop().seq == 1000


def test_bad_arguments(jitter):
    with pytest.raises(ConfigurationError):
        jitter.JitterBuffer(depth=0)
    with pytest.raises(ConfigurationError):
        jitter.JitterBuffer(depth=40)
    jb = jitter.JitterBuffer()
    with pytest.raises(ConfigurationError):
        jb.push(70000, 0, b"x")
    assert jb.push(1, 0, b"x" * 2000) == "too_big"


arrivals = st.lists(
    st.tuples(st.integers(0, 80),                      # packet index in the stream
              st.sampled_from(["push", "push", "push", "pop"]),
              st.integers(0, 40_000_000)),             # arrival jitter, ns
    min_size=1, max_size=200)


@settings(max_examples=300, deadline=None)
@given(ops=arrivals, seq0=st.integers(0, 65535), ts0=st.integers(0, 2**32 - 1),
       depth=st.integers(1, 6), adaptive=st.booleans())
def test_fast_and_twin_agree_step_by_step(ops, seq0, ts0, depth, adaptive):
    fast = load("jitter").JitterBuffer(depth, adaptive=adaptive, max_depth=8)
    twin = twin_jitter.JitterBuffer(depth, adaptive=adaptive, max_depth=8)
    for index, op, jit in ops:
        if op == "push":
            seq = (seq0 + index) & 0xFFFF
            ts = (ts0 + 960 * index) & 0xFFFFFFFF
            data = SILENCE if index % 17 == 16 else payload(index)
            arrival = index * 20_000_000 + jit
            assert fast.push(seq, ts, data, arrival) == twin.push(seq, ts, data, arrival)
        else:
            assert tuple(fast.pop()) == tuple(twin.pop())
        assert fast.buffered == twin.buffered and fast.depth == twin.depth
    assert fast.stats() == twin.stats()


@settings(max_examples=200, deadline=None)
@given(seq0=st.integers(0, 65535), n=st.integers(5, 60), depth=st.integers(2, 5), data=st.data())
def test_any_shuffle_within_the_window_loses_nothing(jitter, seq0, n, depth, data):
    """Packets displaced by less than ``depth`` ticks all play, in order, whatever the permutation."""
    # bounded displacement: sort by index + a random delay below depth (so |position - index| < depth)
    delays = data.draw(st.lists(st.integers(0, depth - 1), min_size=n, max_size=n))
    order = sorted(range(n), key=lambda k: (k + delays[k], k))
    # schedule: arrival tick of packet k is its position in `order`; pop once per arrival
    displacement = max(abs(pos - k) for pos, k in enumerate(order))
    jb = jitter.JitterBuffer(depth=displacement + 1, max_depth=30)
    out = []
    for k in order:
        jb.push((seq0 + k) & 0xFFFF, 960 * k, payload(k))
        out.append(jb.pop())
    out += drain(jb, displacement + 8)
    played = [(p.seq - seq0) & 0xFFFF for p in out if p.kind == "frame"]
    assert played == list(range(n))
    assert jb.stats()["late"] == 0 and jb.stats()["duplicates"] == 0


def test_selector_honours_no_extensions():
    code = "import telecom.jitter as j; print(j.IMPLEMENTATION, j.JitterBuffer.__module__)"
    for env, want in (("1", "twin"), ("", "fast")):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TELECOM_NO_EXTENSIONS": env},
                             capture_output=True, text=True, check=True).stdout
        assert out.split()[0] == want
