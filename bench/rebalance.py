"""Rebalancing between media threads: what it buys when placement went wrong.

Two media threads. 2N connections are created idle, so placement puts N on each thread; then only
thread 0's N start playing PCM that must be Opus-encoded (64 kbit/s, complexity 10). Without
rebalancing, thread 0 carries all the work and thread 1 none; with it (the default), thread 0 hands
connections over once a second. The same scenario runs with ``rebalance`` off and on, alternating,
``--runs`` times each; packets go to a UDP socket nobody reads (the kernel drops what does not fit:
the send cost is still paid).

Reports, over the second half of each run (after the first hand-overs): packets per thread, % sent
within 5 ms of their deadline, each thread's load, the connections moved, and the frames thread 1
sent late to catch up connections handed over by a thread that was behind. Pick N so that N
encoded streams overload one core but not two (on the reference VM, about 110 us a frame: N = 200
is 110 % of a core). Figures only; nothing is asserted.

    python bench/rebalance.py [--n 200] [--seconds 8] [--runs 2]

Writes ``bench/results/rebalance.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import statistics
import time

import numpy as np

from telecom._fast import load

engine_mod = load("engine")
RESULTS = pathlib.Path(__file__).parent / "results" / "rebalance.json"


def tone(seconds: float, freq: float) -> bytes:
    t = np.arange(int(seconds * 48000)) / 48000
    mono = np.round(12000 * np.sin(2 * np.pi * freq * t)).astype("<i2")
    return np.repeat(mono, 2).tobytes()


def one_run(n: int, seconds: float, rebalance: bool) -> dict:
    engine = engine_mod.MediaEngine(2, 0, True, rebalance)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    conns = [engine_mod.NativeConnection(engine, i + 1) for i in range(2 * n)]
    busy = [c for c in conns if c.thread_index == 0]
    socks = []
    pcm = tone(seconds + 2, 440.0)
    for k, c in enumerate(busy):
        src = engine_mod.PcmSource(k + 1, len(pcm))
        src.write(pcm)
        c.attach(src)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.connect(rx.getsockname())
        c.configure(tx.fileno(), 1000 + k, "aead_aes256_gcm_rtpsize", os.urandom(32))
        socks.append(tx)
    engine.start()
    try:
        pending = list(busy)
        deadline = time.monotonic() + 10
        while pending and time.monotonic() < deadline:
            for c in [c for c in pending if c.speaking == "requested"]:
                c.confirm_speaking()
                pending.remove(c)
            time.sleep(0.002)
        time.sleep(seconds / 2)
        first = engine.stats()["threads"]
        time.sleep(seconds / 2)
        last = engine.stats()["threads"]
    finally:
        engine.stop()
        for c in conns:
            c.close()
        for s in socks:
            s.close()
        rx.close()
    threads = []
    for a, b in zip(first, last):
        packets = b["packets"] - a["packets"]
        late = b["late_packets"] - a["late_packets"]
        threads.append({"packets": packets, "late": late, "load_us": b["load_us"],
                        "moved_out": b["moved_out"], "moved_in": b["moved_in"],
                        "caught_up_frames": b["caught_up_frames"]})
    packets = sum(t["packets"] for t in threads)
    late = sum(t["late"] for t in threads)
    return {"rebalance": rebalance, "n": n, "seconds": seconds, "threads": threads,
            "ontime_pct": 100.0 * (packets - late) / packets if packets else 0.0,
            "expected_packets": int(n * 50 * seconds / 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="encoded connections that start on thread 0")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--runs", type=int, default=2, help="runs per setting, alternating")
    args = ap.parse_args()
    rows = []
    print(f"{args.n} encoded streams placed on media thread 0 of 2; load average {os.getloadavg()[0]:.2f}")
    print(f"{'rebalance':>9} {'run':>3} {'on time %':>9} {'packets':>15} {'of':>6} {'load µs/tick':>15} "
          f"{'moved':>5} {'caught up':>9}")
    for run in range(args.runs):
        for rebalance in (False, True):
            r = one_run(args.n, args.seconds, rebalance)
            rows.append(r)
            t0, t1 = r["threads"]
            print(f"{'on' if rebalance else 'off':>9} {run + 1:>3} {r['ontime_pct']:9.2f} "
                  f"{t0['packets']:>7}/{t1['packets']:<7} {r['expected_packets']:>6} "
                  f"{t0['load_us']:>7.0f}/{t1['load_us']:<7.0f} {t0['moved_out']:>5} "
                  f"{t1['caught_up_frames']:>9}")
    for rebalance in (False, True):
        med = statistics.median(r["ontime_pct"] for r in rows if r["rebalance"] == rebalance)
        print(f"rebalance {'on' if rebalance else 'off'}: median {med:.2f} % on time")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows, "load_average": os.getloadavg()}, indent=2))
    print(f"wrote {RESULTS.relative_to(RESULTS.parent.parent.parent)}")


if __name__ == "__main__":
    main()
