"""What a UDP datagram costs the sending core here, outside telecom: the kernel's floor under passthrough.

Compiles ``bench/csrc/udp_send.c`` (with io_uring when liburing's header is installed) and runs, side by
side and alternating, N connected sockets each sending one 160-byte datagram per round (2 ms pause
between rounds, as the engine's send phases have) to a busy ``recvmmsg`` sink on CPU 1:

* ``send``: one ``send()`` per datagram, what telecom's engine does (one socket per connection: each
  voice connection has its own IP-discovery port, so nothing batches across connections);
* ``uring``: the same datagrams submitted through io_uring, 64 per ``io_uring_enter``, registered files;
* ``mmsg``: what sharing one socket between the connections would buy: one unconnected socket sends the
  same datagrams to the same destinations with ``sendmmsg``, 64 per call (telecom does not do this:
  each connection's IP discovery gives it its own address and port).

The passthrough target (5,000 streams per core) leaves 4 µs per 20 ms frame for everything; this shows
how much of that the kernel alone takes. ``--eth ADDR`` also sends to ADDR:9 through the real interface
(real packets leave the machine; nothing is received) to show that loopback is not the expensive part.

    python bench/bench_udp.py [--n 1000,5000] [--repeat 3] [--eth 192.0.2.1]

Prints a table and writes ``bench/results/udp.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "csrc" / "udp_send.c"
RESULTS = HERE / "results" / "udp.json"
DATAGRAMS = 1_000_000  # per run, warm-up included


def build(out: Path) -> tuple[Path, bool]:
    """The program, with io_uring if liburing is there; (path, has_uring)."""
    if shutil.which("gcc") is None:
        sys.exit("bench_udp needs gcc")
    exe = out / "udp_send"
    base = ["gcc", "-O2", "-Wall", "-o", str(exe), str(SOURCE), "-lpthread"]
    if Path("/usr/include/liburing.h").exists():
        done = subprocess.run(["gcc", "-O2", "-Wall", "-DWITH_URING", "-o", str(exe), str(SOURCE), "-luring",
                               "-lpthread"], capture_output=True, text=True)
        if done.returncode == 0:
            return exe, True
        print("liburing build failed, measuring send() only:", done.stderr[-300:], file=sys.stderr)
    subprocess.run(base, check=True)
    return exe, False


def run(exe: Path, mode: str, n: int, dest: str) -> dict:
    # fewer through the real interface: those packets leave the machine
    rounds = max(50, (DATAGRAMS if dest == "loopback" else DATAGRAMS // 5) // n)
    done = subprocess.run([str(exe), mode, str(n), str(rounds), "64", dest], capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"udp_send {mode} {n} {dest}: exit {done.returncode}: {done.stderr.strip()}")
    return json.loads(done.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default="1000,5000", help="comma-separated socket counts")
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs per case (median reported)")
    ap.add_argument("--eth", metavar="ADDR", help="also send to ADDR:9 through the real interface")
    args = ap.parse_args()
    counts = [int(x) for x in args.n.split(",")]
    with tempfile.TemporaryDirectory(prefix="telecom-bench-udp-") as tmp:
        exe, has_uring = build(Path(tmp))
        modes = ["send", "uring", "mmsg"] if has_uring else ["send", "mmsg"]
        dests = ["loopback"] + ([args.eth] if args.eth else [])
        rows = []
        print(f"load average {os.getloadavg()[0]:.2f}; sender CPU 0, sink CPU 1; "
              f"io_uring {'on' if has_uring else 'not built (no liburing header)'}")
        print(f"{'dest':>12} {'sockets':>8} {'mode':>6} {'µs/datagram (runs)':>34} {'median':>7} {'vs send':>8}")
        for dest in dests:
            for n in counts:
                samples: dict[str, list[float]] = {m: [] for m in modes}
                for _ in range(args.repeat):
                    for mode in modes:
                        r = run(exe, mode, n, dest)
                        if r["errors"]:
                            print(f"  ({r['errors']} sends failed in {mode} {n} {dest})")
                        samples[mode].append(r["cpu_us_per_datagram"])
                base = statistics.median(samples["send"])
                for mode in modes:
                    med = statistics.median(samples[mode])
                    runs = " ".join(f"{v:.2f}" for v in samples[mode])
                    print(f"{dest:>12} {n:>8} {mode:>6} {runs:>34} {med:7.2f} {med / base:7.2f}x")
                    rows.append({"dest": dest, "sockets": n, "mode": mode, "runs_us": samples[mode],
                                 "median_us": med, "ratio_vs_send": med / base})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows, "load_average": os.getloadavg(), "io_uring": has_uring},
                                  indent=2))
    print(f"wrote {RESULTS.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
