"""Node density and API latency: how many voice connections one telecom-server holds with frames on
time, and how fast its HTTP API answers under that load.

For each step N: N RemoteClients on one node (a subprocess, ``--media-threads`` as given) join the local
voice server and play a long WAV served over loopback HTTP; after a warm-up the node's per-connection
counters are sampled over ``--seconds``: frames sent, late (> 5 ms after the deadline), skipped, and
underruns (frame deficit). A step passes with the library's density criterion: late + skipped under
0.5 % of the frames sent and no underruns. Meanwhile GET /v1/stats and GET player requests are timed
(p50/p99). Prints a table and writes bench/results/node-t<media threads>.json.

    .venv/bin/python bench/bench_node.py --steps 10,25,50 --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from media import MediaServer  # noqa: E402
from test_server import NodeProcess  # noqa: E402

from telecom.remote import Node, RemoteClient, RemotePlayable  # noqa: E402
from telecom.testing import LocalVoiceServer  # noqa: E402


def timed_get(url: str, password: str) -> float:
    req = urllib.request.Request(url, headers={"Authorization": password})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()
    return (time.perf_counter() - t0) * 1000


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run_step(n: int, seconds: float, threads: int, voice: LocalVoiceServer, media: MediaServer) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc = NodeProcess(tmp, "--allow", "127.0.0.1/32", "--media-threads", str(threads))
        node = Node(proc.url, proc.password).start()
        clients = []
        try:
            base = 7_000_000 + n * 1000
            for i in range(n):
                guild, channel, user = base + i * 10 + 1, base + i * 10 + 2, base + i * 10 + 3
                creds = voice.create_session(guild, channel, user)
                c = RemoteClient(user, guild, creds.session_id, channel_id=channel, node=node)
                c.set_server_info(voice.url, creds.token)
                clients.append(c)
            for c in clients:
                c.wait_ready(30)
                c.play(RemotePlayable.from_url(media.url("/sine/3600.wav")))
            time.sleep(3.0)   # warm-up: decoders filled, speaking started
            before = {c.guild_id: c.stats()["stats"] for c in clients}
            latencies: list[float] = []
            t_end = time.monotonic() + seconds
            i = 0
            while time.monotonic() < t_end:
                c = clients[i % n]
                latencies.append(timed_get(proc.url + "/v1/stats", proc.password))
                latencies.append(timed_get(proc.url + c._player_path, proc.password))
                i += 1
                time.sleep(0.02)
            after = {c.guild_id: c.stats()["stats"] for c in clients}
            keys = ("frames_sent", "late", "skipped", "underruns")
            delta = {k: sum(after[g][k] - before[g][k] for g in after) for k in keys}
            node_stats = json.loads(urllib.request.urlopen(urllib.request.Request(
                proc.url + "/v1/stats", headers={"Authorization": proc.password})).read())
        finally:
            for c in clients:
                c.close()
            node.close()
            proc.stop()
    expected = n * seconds / 0.020
    bad = (delta["late"] + delta["skipped"]) / max(delta["frames_sent"], 1)
    return {"connections": n, "media_threads": threads, "seconds": seconds,
            "frames_sent": delta["frames_sent"], "frames_expected": round(expected),
            "late": delta["late"], "skipped": delta["skipped"], "underruns": delta["underruns"],
            "late_or_skipped_pct": round(100 * bad, 3),
            "held": bad < 0.005 and delta["underruns"] == 0,
            "http_requests": len(latencies), "http_p50_ms": round(pct(latencies, 0.5), 2),
            "http_p99_ms": round(pct(latencies, 0.99), 2), "http_mean_ms": round(statistics.fmean(latencies), 2),
            "load_average": round(os.getloadavg()[0], 2),
            "node_cpu_load": node_stats["cpu"]["process_load"], "node_rss_mb": node_stats["memory"]["rss"] / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="10,25,50", help="connection counts (comma-separated)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per step")
    parser.add_argument("--media-threads", type=int, default=1)
    args = parser.parse_args()
    voice = LocalVoiceServer(dave=False, heartbeat_interval=5.0)
    voice.start_background()
    rows = []
    try:
        with MediaServer({}) as media:
            for n in [int(s) for s in args.steps.split(",")]:
                row = run_step(n, args.seconds, args.media_threads, voice, media)
                rows.append(row)
                print(f"{n:>5} conns  sent {row['frames_sent']:>7}/{row['frames_expected']:<7} "
                      f"late+skipped {row['late_or_skipped_pct']:>6.3f}%  underruns {row['underruns']:>4}  "
                      f"held {'yes' if row['held'] else 'NO ':3}  http p50 {row['http_p50_ms']:>6.2f} ms  "
                      f"p99 {row['http_p99_ms']:>7.2f} ms  cpu {row['node_cpu_load']:.2f}  "
                      f"rss {row['node_rss_mb']:.0f} MiB  loadavg {row['load_average']}", flush=True)
    finally:
        voice.stop_background()
    out = os.path.join(ROOT, "bench", "results", f"node-t{args.media_threads}.json")
    with open(out, "w") as fh:
        json.dump({"cpus": os.cpu_count(), "rows": rows}, fh, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
