"""Codec and mixer costs per 20 ms frame: Opus encode/decode settings and int16 mixing, fast vs twin.

Two ways to run it:

* ``.venv/bin/python bench/bench_codec.py``: standalone, prints a table (µs per 20 ms frame, the
  fast/twin ratios measured side by side) and writes ``bench/results/codec.json``;
* ``.venv/bin/python -m pytest bench/bench_codec.py``: the same cases under pytest-benchmark (the JSON
  is written at the end of the module too).

Figures only, no assertions on time (PERFORMANCE.md: absolute numbers drift on shared VMs; ratios
measured in one run are what to compare).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import platform
import random
import statistics
import struct
import sys
import time
from typing import Callable

import pytest

from telecom._fast import load
from telecom._twin import mixer as twin_mixer
from telecom.opus import FRAME_SAMPLES, LIBOPUS_VERSION, Decoder, Encoder

fast_mixer = load("mixer")

RESULTS = pathlib.Path(__file__).parent / "results" / "codec.json"
FRAMES = 50  # one second of audio, cycled


def music_like_pcm(seconds: float = 1.0) -> list[bytes]:
    """Chords with vibrato and a little noise: busier than a pure tone, so the encoder works for real."""
    rnd = random.Random(7)
    n = int(seconds * 48000)
    out = []
    for i in range(n):
        t = i / 48000
        vib = 1 + 0.003 * math.sin(2 * math.pi * 5 * t)
        s = sum(math.sin(2 * math.pi * f * vib * t) / (k + 1) for k, f in enumerate((220, 277.2, 329.6, 440, 1760)))
        left = int(7000 * s + rnd.gauss(0, 300))
        right = int(7000 * s * 0.8 + rnd.gauss(0, 300))
        out.append(struct.pack("<hh", max(-32768, min(32767, left)), max(-32768, min(32767, right))))
    data = b"".join(out)
    step = FRAME_SAMPLES * 4
    return [data[i : i + step] for i in range(0, len(data) - step + 1, step)]


PCM_FRAMES = music_like_pcm()


def _encode_case(**settings) -> Callable[[], object]:
    enc = Encoder(**settings)
    frames = itertools.cycle(PCM_FRAMES)
    return lambda: enc.encode(next(frames))


def _encode_round_robin_case(n: int) -> Callable[[], object]:
    """``n`` encoders taking turns, one frame each, as a media thread walks its connections: every
    call finds its encoder's ~48 KiB of state cold. Compared with ``encode_64k_c10`` (one hot
    encoder) it says whether many streams cost more per frame than one."""
    encoders = [Encoder(bitrate=64000, complexity=10) for _ in range(n)]
    frames = itertools.cycle(PCM_FRAMES)
    turn = itertools.cycle(encoders)
    return lambda: next(turn).encode(next(frames))


def _decode_case() -> Callable[[], object]:
    enc = Encoder(bitrate=64000)
    packets = [enc.encode(f) for f in PCM_FRAMES]
    dec = Decoder()
    it = itertools.cycle(packets)
    return lambda: dec.decode(next(it))


def _mix_case(impl, sources: int) -> Callable[[], object]:
    frames = PCM_FRAMES[:sources]
    percents = [80.0] * sources  # a non-unity volume: the general (rounding) path
    return lambda: impl.mix(frames, percents)


CASES: dict[str, Callable[[], Callable[[], object]]] = {
    "encode_64k_c10": lambda: _encode_case(bitrate=64000, complexity=10),
    "encode_64k_c5": lambda: _encode_case(bitrate=64000, complexity=5),
    "encode_64k_c10_fec15": lambda: _encode_case(bitrate=64000, complexity=10, fec=True, expected_loss=15),
    "encode_64k_c10_120_in_turn": lambda: _encode_round_robin_case(120),
    "decode_64k": _decode_case,
}
for _n in (1, 2, 4):
    CASES[f"mix_{_n}_fast"] = (lambda n: lambda: _mix_case(fast_mixer, n))(_n)
    CASES[f"mix_{_n}_twin"] = (lambda n: lambda: _mix_case(twin_mixer, n))(_n)


def _ratios(us: dict[str, float]) -> dict[str, float]:
    out = {}
    for n in (1, 2, 4):
        f, t = us.get(f"mix_{n}_fast"), us.get(f"mix_{n}_twin")
        if f and t:
            out[f"mix_{n}_twin_over_fast"] = t / f
    if "encode_64k_c10" in us and "encode_64k_c10_fec15" in us:
        out["encode_fec15_over_c10"] = us["encode_64k_c10_fec15"] / us["encode_64k_c10"]
    if "encode_64k_c10" in us and "encode_64k_c10_120_in_turn" in us:
        out["encode_120_in_turn_over_one"] = us["encode_64k_c10_120_in_turn"] / us["encode_64k_c10"]
    return out


def write_results(us: dict[str, float], mode: str) -> dict:
    report = {
        "unit": "microseconds per 20 ms frame (median)",
        "mode": mode,
        "libopus": LIBOPUS_VERSION,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "results": us,
        "ratios": _ratios(us),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    return report


# ---- pytest-benchmark mode -------------------------------------------------------------------------

_collected: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _write_json_at_end():
    yield
    if _collected:
        write_results(dict(_collected), "pytest-benchmark")


@pytest.mark.parametrize("case", list(CASES))
def test_codec(benchmark, case):
    fn = CASES[case]()
    benchmark.group = case.rsplit("_", 1)[0] if case.startswith("mix_") else "opus"
    benchmark(fn)
    _collected[case] = benchmark.stats.stats.median * 1e6


# ---- standalone mode -------------------------------------------------------------------------------


def measure(fn: Callable[[], object], min_time: float = 0.25, repeats: int = 7) -> float:
    """Median µs per call over ``repeats`` runs of a loop lasting about ``min_time`` seconds."""
    for _ in range(20):  # warm up (caches, encoder analysis state)
        fn()
    calls = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if time.perf_counter() - t0 >= min_time / 4:
            break
        calls *= 2
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter_ns() - t0) / calls / 1000)
    return statistics.median(runs)


def main() -> None:
    us = {}
    for name, make in CASES.items():
        us[name] = measure(make())
        print(f"{name:24s} {us[name]:9.2f} µs/frame", flush=True)
    report = write_results(us, "standalone")
    for name, ratio in report["ratios"].items():
        print(f"{name:24s} {ratio:9.1f}x")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
