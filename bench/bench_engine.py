"""Engine costs per 20 ms frame: pack + seal, encode, mix, and whole scheduler ticks.

Two ways to run it:

* ``.venv/bin/python bench/bench_engine.py``: standalone, prints a table and writes
  ``bench/results/engine.json``;
* ``.venv/bin/python -m pytest bench/bench_engine.py``: the same cases under pytest-benchmark.

The tick cases drive an engine whose threads are not started, through ``MediaEngine.run_tick`` (one
prepare + send pass, synchronously), against a UDP socket nobody reads (the kernel drops what does
not fit: the send cost is still paid). Figures only, no assertions on time.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import statistics
import time
from typing import Callable

import pytest

from telecom._fast import load
from telecom._fast.rtp import pack_header

engine_mod = load("engine")
aead = load("aead")
mixer = load("mixer")
opus = load("opus")

RESULTS = pathlib.Path(__file__).parent / "results" / "engine.json"
MODES = ["aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize"]


def _tone(seconds: float = 1.0) -> bytes:
    import numpy as np

    t = np.arange(int(seconds * 48000)) / 48000
    mono = np.round(16000 * np.sin(2 * np.pi * 440 * t)).astype("<i2")
    return np.repeat(mono, 2).tobytes()


PCM = _tone()
FRAMES = [PCM[i : i + 3840] for i in range(0, len(PCM), 3840)]
_enc = opus.Encoder(bitrate=64000, complexity=10)
PACKETS = [_enc.encode(f) for f in FRAMES]


class TickRig:
    """``n`` connections on an unstarted engine, each playing one source, all Speaking."""

    def __init__(self, n: int, kind: str) -> None:
        self.engine = engine_mod.MediaEngine(1)
        self.kind = kind
        self.rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rx.bind(("127.0.0.1", 0))
        self.socks, self.conns, self.sources = [], [], []
        for i in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.connect(self.rx.getsockname())
            c = engine_mod.NativeConnection(self.engine, i + 1)
            c.configure(s.fileno(), 1000 + i, MODES[0], os.urandom(32))
            self.socks.append(s)
            self.conns.append(c)
            if kind == "passthrough":
                src = engine_mod.OpusSource(10_000 + i, 64 * 1277, 64)
            elif kind == "encoded":
                src = engine_mod.PcmSource(10_000 + i, 64 * 3840)
            else:
                src = None                      # idle: no source at all
            if src is not None:
                c.attach(src)
                self.sources.append(src)
        self.tick = self.engine.current_tick() + 10
        self.refill()
        if kind != "idle":
            self.engine.run_tick(0, self.tick)  # asks for Speaking
            for c in self.conns:
                c.confirm_speaking()
            self.tick += 10
        self.k = 0

    def refill(self) -> None:
        for src in self.sources:
            if self.kind == "passthrough":
                src.push_many(PACKETS[: 64 - src.buffered])
            else:
                src.write(PCM[: (64 * 3840 - src.buffered)], True)

    def run(self) -> int:
        self.tick += 1
        self.k += 1
        if self.k % 50 == 0:
            self.refill()
        return self.engine.run_tick(0, self.tick)

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.engine.run_tick(0, self.tick + 1)  # frees them
        for s in self.socks:
            s.close()
        self.rx.close()


def seal_case(mode: str) -> Callable[[], bytes]:
    cipher = aead.TransportCipher(mode, os.urandom(32))
    payload = PACKETS[10]
    counter = [0]

    def run() -> bytes:
        counter[0] += 1
        return cipher.seal(pack_header(counter[0] & 0xFFFF, counter[0] * 960 & 0xFFFFFFFF, 1234), payload,
                           counter[0])
    return run


def encode_case() -> Callable[[], bytes]:
    enc = opus.Encoder(bitrate=64000, complexity=10)
    k = [0]

    def run() -> bytes:
        k[0] = (k[0] + 1) % 50
        return enc.encode(FRAMES[k[0]])
    return run


def mix8_case() -> Callable[[], bytes]:
    frames = FRAMES[:8]
    return lambda: mixer.mix(frames)


# -- pytest-benchmark ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_pack_and_seal_one_packet(benchmark, mode):
    benchmark(seal_case(mode))


def test_encode_one_frame_64k_c10(benchmark):
    benchmark(encode_case())


def test_mix_8_sources(benchmark):
    benchmark(mix8_case())


@pytest.mark.parametrize("n,kind", [(1000, "passthrough"), (10000, "idle"), (50, "encoded")])
def test_one_scheduler_tick(benchmark, n, kind):
    rig = TickRig(n, kind)
    try:
        benchmark.pedantic(rig.run, rounds=100, iterations=1, warmup_rounds=5)
    finally:
        rig.close()


# -- standalone ---------------------------------------------------------------------------------------

def _per_call_us(fn: Callable[[], object], seconds: float = 0.5) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(100):
            fn()
        n += 100
    return (time.perf_counter() - t0) / n * 1e6


def _tick_us(n: int, kind: str, rounds: int = 200) -> float:
    rig = TickRig(n, kind)
    try:
        times = [rig.run() for _ in range(rounds)]
    finally:
        rig.close()
    return statistics.median(times) / 1e3


def main() -> None:
    rows = []
    for mode in MODES:
        rows.append((f"pack + seal one packet ({mode.split('_')[1]})", _per_call_us(seal_case(mode)), 1))
    rows.append(("Opus encode one frame 64k c10", _per_call_us(encode_case()), 1))
    rows.append(("mix 8 sources (Python call)", _per_call_us(mix8_case()), 1))
    for n, kind in [(1000, "passthrough"), (5000, "passthrough"), (10000, "idle"), (50, "encoded")]:
        rows.append((f"one tick, {n} {kind} connections", _tick_us(n, kind), n))
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    pkt = bytes(200)
    for mmsg in (False, True):
        ns = statistics.median(engine_mod.bench_send(tx.fileno(), pkt, 20000, mmsg) for _ in range(5))
        rows.append((f"UDP send, one datagram via {'sendmmsg(1)' if mmsg else 'send()'}", ns / 1e3, 1))
    print(f"{'case':<46} {'µs/call':>10} {'µs/stream':>10}")
    out = []
    for name, us, n in rows:
        print(f"{name:<46} {us:10.2f} {us / n:10.3f}")
        out.append({"case": name, "us_per_call": us, "us_per_stream": us / n})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": out, "load_average": os.getloadavg()}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
