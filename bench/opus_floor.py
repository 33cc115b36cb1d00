"""What one Opus frame costs libopus alone here, outside telecom: the floor under encoded density.

Compiles ``bench/csrc/opus_encode.c`` against each libopus given and runs them alternating, pinned to
CPU 0: ``--encoders`` encoders taking turns (as a media thread's connections do) encode 64 kbit/s,
complexity 10, FEC-off stereo 20 ms frames of a tone, a music-like and a speech-like signal. Prints the
thread CPU time per frame, and what that leaves of a core for 180 streams (the density target).

Libraries: by default the one ``scripts/bootstrap`` links (``scripts/build-libopus``, cached) and the
system's (``-lopus``, when its header is installed). ``--prefix DIR`` (repeatable) adds other builds,
e.g. one configured with another compiler, each a prefix with ``include/opus`` and ``lib/libopus.a``.

    python bench/opus_floor.py [--frames 1000] [--encoders 4] [--rounds 3] [--prefix DIR ...]

Writes ``bench/results/opus_floor.json``. Figures only; nothing is asserted.
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
ROOT = HERE.parent
SOURCE = HERE / "csrc" / "opus_encode.c"
RESULTS = HERE / "results" / "opus_floor.json"
SIGNALS = ("tone", "music", "speech")
TARGET_STREAMS = 180


def bootstrap_prefix() -> Path | None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "build-libopus")], capture_output=True,
                          text=True)
    lines = done.stdout.strip().splitlines()
    return Path(lines[-1]) if done.returncode == 0 and lines else None


def build(name: str, prefix: Path | None, out: Path) -> Path:
    exe = out / f"opus_encode-{name}"
    if prefix is None:
        link = ["-I/usr/include/opus", "-lopus"]
    else:
        link = [f"-I{prefix / 'include' / 'opus'}", str(prefix / "lib" / "libopus.a")]
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(SOURCE), *link, "-lm"], check=True)
    return exe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=1000, help="frames per encoder per run")
    ap.add_argument("--encoders", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs per library and signal")
    ap.add_argument("--prefix", action="append", default=[], help="another libopus install prefix")
    args = ap.parse_args()
    if shutil.which("gcc") is None:
        sys.exit("opus_floor needs gcc")
    libraries: list[tuple[str, Path | None]] = []
    own = bootstrap_prefix()
    if own is not None:
        libraries.append(("bootstrap", own))
    if Path("/usr/include/opus/opus.h").exists():
        libraries.append(("system", None))
    libraries += [(Path(p).name, Path(p)) for p in args.prefix]
    if not libraries:
        sys.exit("no libopus to measure")
    samples: dict[tuple[str, str], list[float]] = {}
    versions: dict[str, str] = {}
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    with tempfile.TemporaryDirectory(prefix="telecom-opus-floor-") as tmp:
        exes = {name: build(name, prefix, Path(tmp)) for name, prefix in libraries}
        for _ in range(args.rounds):
            for signal in SIGNALS:
                for name, exe in exes.items():
                    done = subprocess.run([*pin, str(exe), signal, str(args.frames), str(args.encoders)],
                                          capture_output=True, text=True, check=True)
                    row = json.loads(done.stdout)
                    versions[name] = row["version"]
                    samples.setdefault((name, signal), []).append(row["us_per_frame"])
    print(f"libopus alone, 64 kbit/s complexity 10, {args.encoders} encoders taking turns, CPU 0, "
          f"{args.rounds} alternating rounds; load average {os.getloadavg()[0]:.2f}")
    print(f"{'library':>12} {'version':>16} {'signal':>7} {'µs/frame (runs)':>26} {'median':>7} "
          f"{'core for ' + str(TARGET_STREAMS):>13}")
    rows = []
    for name, _ in libraries:
        for signal in SIGNALS:
            runs = samples[(name, signal)]
            med = statistics.median(runs)
            share = med * TARGET_STREAMS * 50 / 1e6
            print(f"{name:>12} {versions[name]:>16} {signal:>7} {' '.join(f'{v:.1f}' for v in runs):>26} "
                  f"{med:7.1f} {share:12.0%}")
            rows.append({"library": name, "version": versions[name], "signal": signal, "runs_us": runs,
                         "median_us": med, "core_share_at_180": share})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows, "encoders": args.encoders, "frames": args.frames,
                                   "load_average": os.getloadavg()}, indent=2))
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
