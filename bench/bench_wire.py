"""Per-packet cost of the wire core: ``pack_header + seal`` (and ``open``) of a 160-byte payload.

Two ways to run it (it is outside ``testpaths``, so the normal test run never collects it):

    .venv/bin/python -m pytest bench/bench_wire.py          # pytest-benchmark tables
    .venv/bin/python bench/bench_wire.py                    # side-by-side figures + bench/results/wire.json

The standalone mode times the compiled module and the pure-Python twin in the same run (ratios are
what to compare across machines, PERFORMANCE.md), plus the C-only send work (``rtp_write_header +
aead_seal`` in a nogil loop) and what keying the AES-GCM context once saves over re-keying per packet.
It prints figures and asserts nothing about time.
"""

from __future__ import annotations

import json
import pathlib
import platform
import statistics
import sys
import time

import pytest

from telecom._fast import load
from telecom._twin import aead as twin_aead
from telecom._twin import rtp as twin_rtp

MODES = ("aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize")
PAYLOAD = bytes(range(160))
KEY = bytes(range(32))
SSRC = 0x1234ABCD


def implementations():
    return {"fast": (load("rtp"), load("aead")), "twin": (twin_rtp, twin_aead)}


def _send_one(rtp, cipher):
    counter = [0]

    def one():
        i = counter[0] = (counter[0] + 1) & 0xFFFFFFFF
        return cipher.seal(rtp.pack_header(i & 0xFFFF, (i * 960) & 0xFFFFFFFF, SSRC), PAYLOAD, i)

    return one


@pytest.mark.parametrize("impl", ["fast", "twin"])
@pytest.mark.parametrize("mode", MODES)
def test_pack_header_and_seal(benchmark, impl, mode):
    rtp, aead = implementations()[impl]
    packet = benchmark(_send_one(rtp, aead.TransportCipher(mode, KEY)))
    assert len(packet) == 12 + 160 + 20


@pytest.mark.parametrize("impl", ["fast", "twin"])
@pytest.mark.parametrize("mode", MODES)
def test_open(benchmark, impl, mode):
    rtp, aead = implementations()[impl]
    cipher = aead.TransportCipher(mode, KEY)
    packet = cipher.seal(rtp.pack_header(1, 960, SSRC), PAYLOAD, 1)
    assert benchmark(cipher.open, packet).payload == PAYLOAD


# --- standalone ----------------------------------------------------------------------------------

def _time_send(rtp, cipher, n: int) -> int:
    pack_header, seal, payload = rtp.pack_header, cipher.seal, PAYLOAD
    t0 = time.perf_counter_ns()
    for i in range(n):
        seal(pack_header(i & 0xFFFF, (i * 960) & 0xFFFFFFFF, SSRC), payload, i)
    return time.perf_counter_ns() - t0


def _time_open(cipher, packet: bytes, n: int) -> int:
    open_ = cipher.open
    t0 = time.perf_counter_ns()
    for _ in range(n):
        open_(packet)
    return time.perf_counter_ns() - t0


def _best_and_median(fn, n: int, repeats: int) -> tuple[float, float]:
    runs = [fn(n) / n / 1000 for _ in range(repeats)]      # µs per packet
    return min(runs), statistics.median(runs)


def main(n: int = 50_000, repeats: int = 7) -> dict:
    impls = implementations()
    fast_aead = impls["fast"][1]
    report: dict = {"python": sys.version.split()[0], "machine": platform.machine(),
                    "payload_bytes": len(PAYLOAD), "packets_per_run": n, "repeats": repeats, "modes": {}}
    for mode in MODES:
        entry: dict = {}
        for name, (rtp, aead) in impls.items():
            cipher = aead.TransportCipher(mode, KEY)
            packet = cipher.seal(rtp.pack_header(1, 960, SSRC), PAYLOAD, 1)
            _time_send(rtp, cipher, 2000)                     # warm up
            send = _best_and_median(lambda k: _time_send(rtp, cipher, k), n, repeats)
            opened = _best_and_median(lambda k: _time_open(cipher, packet, k), n, repeats)
            entry[name] = {"send_us_best": send[0], "send_us_median": send[1],
                           "open_us_best": opened[0], "open_us_median": opened[1]}
        c_only = [fast_aead._bench_c_seal(mode, n * 4) / (n * 4) / 1000 for _ in range(repeats)]
        entry["c_only_send_us_best"] = min(c_only)
        if mode == "aead_aes256_gcm_rtpsize":
            rekey = [fast_aead._bench_c_seal(mode, n * 4, 160, True) / (n * 4) / 1000
                     for _ in range(repeats)]
            entry["c_only_send_rekey_per_packet_us_best"] = min(rekey)
        entry["send_fast_over_twin"] = entry["fast"]["send_us_best"] / entry["twin"]["send_us_best"]
        entry["send_speedup"] = entry["twin"]["send_us_best"] / entry["fast"]["send_us_best"]
        entry["open_speedup"] = entry["twin"]["open_us_best"] / entry["fast"]["open_us_best"]
        report["modes"][mode] = entry

    print(f"wire core, {len(PAYLOAD)}-byte payload, best of {repeats} × {n} packets (median in brackets)")
    for mode, e in report["modes"].items():
        print(f"\n{mode}")
        for name in ("fast", "twin"):
            r = e[name]
            print(f"  {name}: pack_header+seal {r['send_us_best']:.3f} µs ({r['send_us_median']:.3f})"
                  f"   open {r['open_us_best']:.3f} µs ({r['open_us_median']:.3f})")
        print(f"  fast/twin (send) = {e['send_fast_over_twin']:.3f}   i.e. fast is "
              f"{e['send_speedup']:.2f}× faster to send, {e['open_speedup']:.2f}× faster to open")
        print(f"  C only (rtp_write_header + aead_seal, no Python): {e['c_only_send_us_best']:.3f} µs")
        if "c_only_send_rekey_per_packet_us_best" in e:
            print(f"  C only, re-keying AES per packet instead of once: "
                  f"{e['c_only_send_rekey_per_packet_us_best']:.3f} µs")

    out = pathlib.Path(__file__).parent / "results" / "wire.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
