"""Soak: many streams with receive and muxers for a long time; does anything grow?

    python bench/soak.py                      # 100 streams, 30 minutes (the issue's figure)
    python bench/soak.py --streams 20 --minutes 2

Streams come in pairs sharing a channel on the local voice server (in a separate process: it keeps
every packet it receives): each client plays a tone from a
PCM pipe that a feeder thread keeps topped up, and receives its partner, whom it records to a file;
the first client of each pair also runs a muxer (both of them, itself included) into a second file.
Every ``--sample`` seconds it records RSS, open fds, threads and the clients' counters; at the end it
prints start/end and the drift and writes ``bench/results/soak.json``. Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

from telecom import Client, Output, Playable  # noqa: E402
from telecom.testing import LocalVoiceServer  # noqa: E402

SAMPLE_RATE = 48000


def tone(seconds: float, freq: float) -> bytes:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    mono = np.round(16000 * np.sin(2 * np.pi * freq * t)).astype("<i2")
    return np.repeat(mono, 2).tobytes()


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def snapshot(clients) -> dict:
    totals: dict[str, float] = {}
    for c in clients:
        for k, v in c.stats().items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                totals[k] = totals.get(k, 0) + v
    return {
        "t": time.monotonic(),
        "rss_kib": rss_kib(),
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": threading.active_count(),
        "cpu_s": resource.getrusage(resource.RUSAGE_SELF).ru_utime
        + resource.getrusage(resource.RUSAGE_SELF).ru_stime,
        "frames_sent": totals.get("frames_sent", 0),
        "underruns": totals.get("underruns", 0),
        "late": totals.get("late", 0),
    }


def _server_process(conn, dave: bool) -> None:
    """The local voice server in its own process: it records every packet it receives, which must
    not count as the soaked process's memory. Answers ("session", guild, channel, user) requests."""
    server = LocalVoiceServer(dave=dave)
    server.start_background()
    conn.send(("url", server.url))
    while True:
        msg = conn.recv()
        if msg == "stop":
            break
        _, guild, channel, user = msg
        creds = server.create_session(guild, channel, user)
        conn.send((creds.session_id, creds.token))
    server.stop_background()


class RemoteServer:
    def __init__(self, dave: bool) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_server_process, args=(child, dave), daemon=True)
        self._proc.start()
        _, self.url = self._conn.recv()

    def create_session(self, guild: int, channel: int, user: int) -> tuple[str, str]:
        self._conn.send(("session", guild, channel, user))
        return self._conn.recv()

    def stop(self) -> None:
        self._conn.send("stop")
        self._proc.join(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--sample", type=float, default=30.0, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=30.0, help="seconds before the start sample")
    ap.add_argument("--out", default="bench/results/soak.json")
    ap.add_argument("--dave", action="store_true", help="a DAVE channel (E2EE both ways)")
    args = ap.parse_args()

    server = RemoteServer(args.dave)
    tmp = tempfile.TemporaryDirectory(prefix="telecom-soak-")
    clients, pipes, outputs = [], [], []
    chunk = {f: tone(1.0, f) for f in (330.0, 440.0, 550.0, 660.0)}
    try:
        for pair in range(max(1, args.streams // 2)):
            guild, channel = 10_000 + pair, 20_000 + pair
            users = [30_000 + 2 * pair, 30_001 + 2 * pair]
            members = []
            for uid in users:
                session_id, token = server.create_session(guild, channel, uid)
                c = Client(uid, guild, session_id, channel_id=channel)
                c.set_server_info(server.url, token)
                members.append(c)
            for c in members:
                c.wait_ready(20)
            for i, c in enumerate(members):
                other = users[1 - i]
                out = Output.to_file(os.path.join(tmp.name, f"{c.user_id}-hears-{other}.flac"))
                c.get_user(other).set_output(out)
                outputs.append(out)
                if i == 0:
                    m = Output.muxer(include_self=True)
                    outputs.append(m.set_output(Output.to_file(os.path.join(tmp.name, f"mux-{pair}.flac"))))
                    c.set_output_muxer(m)
                pipe = Playable.from_pcm_pipe(buffer_seconds=4.0)
                c.play(pipe)
                pipes.append((pipe, chunk[(330.0, 440.0, 550.0, 660.0)[(2 * pair + i) % 4]]))
            clients.extend(members)

        stop = threading.Event()

        def feeder() -> None:
            # Keeps ~2 s queued in every pipe: 1 s chunks whenever there is room.
            while not stop.is_set():
                for pipe, data in pipes:
                    try:
                        while pipe.buffered < 2 * 192_000:  # bytes: 2 s of 48 kHz s16 stereo
                            pipe.send(data)
                    except Exception as exc:  # noqa: BLE001 - reported, the soak goes on
                        print("feeder:", exc, file=sys.stderr)
                stop.wait(0.25)

        feed = threading.Thread(target=feeder, name="soak-feeder", daemon=True)
        feed.start()
        print(f"{len(clients)} clients playing and receiving; warm-up {args.warmup:.0f} s", flush=True)
        time.sleep(args.warmup)
        samples = [snapshot(clients)]
        end = time.monotonic() + args.minutes * 60
        while time.monotonic() < end:
            time.sleep(min(args.sample, max(0.0, end - time.monotonic())))
            samples.append(snapshot(clients))
            s = samples[-1]
            print(f"  +{s['t'] - samples[0]['t']:7.0f} s  rss {s['rss_kib'] / 1024:7.1f} MiB  fds {s['fds']}"
                  f"  threads {s['threads']}  underruns {s['underruns']:.0f}  late {s['late']:.0f}", flush=True)
        stop.set()
        feed.join(5)
        first, last = samples[0], samples[-1]
        # Drift measured on the second half against the first sample after warm-up.
        report = {
            "streams": len(clients),
            "minutes": args.minutes,
            "rss_start_mib": first["rss_kib"] / 1024,
            "rss_end_mib": last["rss_kib"] / 1024,
            "rss_drift_pct": 100.0 * (last["rss_kib"] - first["rss_kib"]) / first["rss_kib"],
            "fds_start": first["fds"], "fds_end": last["fds"],
            "threads_start": first["threads"], "threads_end": last["threads"],
            "cpu_share": (last["cpu_s"] - first["cpu_s"]) / max(1e-9, last["t"] - first["t"]),
            "frames_sent": last["frames_sent"] - first["frames_sent"],
            "underruns": last["underruns"] - first["underruns"],
            "samples": samples,
        }
    finally:
        for c in clients:
            c.close()
        for o in outputs:
            try:
                o.close()
            except Exception:  # noqa: BLE001
                pass
        server.stop()
        tmp.cleanup()
    print(f"RSS {report['rss_start_mib']:.1f} → {report['rss_end_mib']:.1f} MiB "
          f"(drift {report['rss_drift_pct']:+.2f} %, target < 5 %); fds {report['fds_start']} → "
          f"{report['fds_end']}; threads {report['threads_start']} → {report['threads_end']}; "
          f"CPU {100 * report['cpu_share']:.0f} % of a core; underruns {report['underruns']:.0f}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
