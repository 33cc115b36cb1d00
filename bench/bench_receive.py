"""Receive density: speakers decoded + jitter-buffered + muxed per core, native vs pure Python.

    .venv/bin/python bench/bench_receive.py [--speakers 50,200,400] [--seconds 5] [--socket-seconds 5]

Figures (printed as a table, written to ``bench/results/receive.json``; nothing is asserted):

- **core**: pre-encrypted rtpsize packets (AES-256-GCM, with the SFU's encrypted header extension,
  64 kbit/s Opus of a tone, 20 ms) fed straight into the native receive core, no sockets: per tick
  every speaker's packet is opened, routed, jitter-buffered, then played out (Opus decode) and mixed
  into one muxer, all in one GIL-free loop (``ReceiveCore.run_ticks``). Speakers are spread over
  connections of 25 (a bot in many guilds). ``speakers_per_core`` = 20 ms / CPU time per
  speaker-frame (thread CPU time; the wall time is reported too).
- **socket**: the same packets sent over loopback UDP from a paced Python sender thread to real
  connected sockets; the core's own thread (epoll + recvmmsg + timerfd) receives them in real time.
  CPU = the receive thread's utime+stime from /proc, so the sender's cost is not counted.
- **twin**: the pure-Python jitter buffer (``telecom._twin.jitter``) on the same arrival pattern
  (push + pop per speaker-frame), against the compiled one through the same Python API and against
  its C core in a GIL-free loop (``telecom._fast.jitter.bench_push_pop``), for the ratios.
- **per-user outputs**: the Python output worker's cost per delivered frame (batch to records to
  ``AudioFrame`` to a no-op callback output, or to a WAV file output), i.e. how many users with their
  own output one worker thread keeps up with.
- **python**: a whole receive step in pure Python for comparison (``cryptography`` AES-GCM open +
  opuslib decode + twin jitter buffer + numpy mix), per speaker-frame.

The reference machine is a 2 vCPU VM (PERFORMANCE.md: target >= 400 speakers per core).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import socket
import sys
import threading
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from telecom._fast import load  # noqa: E402
from telecom._twin import jitter as twin_jitter  # noqa: E402
from telecom.output import Output  # noqa: E402
from telecom.testing.transport import TransportCipher, relay_packet  # noqa: E402

receive = load("receive")
fast_jitter = load("jitter")
opus = load("opus")

MODE = "aead_aes256_gcm_rtpsize"
FRAMES_PER_SECOND = 50
PER_CONN = 25
TICK_NS = 20_000_000
SILENCE = b"\xf8\xff\xfe"


def tone_frames(n: int) -> list[bytes]:
    """n distinct 64 kbit/s Opus frames of a 440 Hz tone (a looped source)."""
    t = np.arange(n * 960) / 48000
    pcm = np.repeat(np.round(16000 * np.sin(2 * np.pi * 440 * t)).astype("<i2"), 2).tobytes()
    enc = opus.Encoder(bitrate=64000)
    return [enc.encode(pcm[i * 3840:(i + 1) * 3840]) for i in range(n)]


def build(speakers: int, ticks: int, key: bytes, frames: list[bytes]):
    """Per tick, per speaker: (conn_id, ssrc, user_id, wire packet)."""
    cipher = TransportCipher(MODE, key)
    counters: dict[int, int] = {}
    out = []
    for t in range(ticks):
        row = []
        for s in range(speakers):
            conn = 1 + s // PER_CONN
            counter = counters.get(conn, 0)
            counters[conn] = counter + 1
            # the stream ends as a Discord sender's does: 5 silence frames (spec §2.5)
            payload = SILENCE if t >= ticks - 5 else frames[(t + s) % len(frames)]
            wire = relay_packet(cipher, counter, marker=False, payload_type=0x78,
                                sequence=(s * 1000 + t) & 0xFFFF, timestamp=(t * 960) & 0xFFFFFFFF,
                                ssrc=10_000 + s, payload=payload, audio_level=30)
            row.append((conn, 10_000 + s, 1_000 + s, wire))
        out.append(row)
    return out


def setup_core(speakers: int, key: bytes, fds: dict[int, int] | None = None):
    core = receive.ReceiveCore()
    conns = sorted({1 + s // PER_CONN for s in range(speakers)})
    for conn in conns:
        core.add_connection(conn, -1 if fds is None else fds[conn], MODE, key)
    for s in range(speakers):
        core.map_ssrc(1 + s // PER_CONN, 10_000 + s, 1_000 + s)
    core.add_muxer(1, 200_000_000, origin_ns=0)
    for conn in conns:
        core.attach_muxer(conn, 1)
    return core


def bench_core(speakers: int, ticks: int, key: bytes, frames: list[bytes]) -> dict:
    rows = build(speakers, ticks, key, frames)
    core = setup_core(speakers, key)
    warm = 25
    core.run_ticks([[(c, w) for c, _, _, w in row] for row in rows[:warm]], 0)
    batches = [[(c, w) for c, _, _, w in row] for row in rows[warm:]]
    cpu0 = time.thread_time()
    ns = core.run_ticks(batches, warm * TICK_NS)
    cpu = time.thread_time() - cpu0
    frames_done = speakers * (ticks - warm)
    stats = [core.conn_stats(c) for c in sorted({1 + s // PER_CONN for s in range(speakers)})]
    # CPU time of this thread (the loop runs in it without the GIL): on a shared machine wall time
    # also counts the time other processes had the core; the CPU time is the work itself.
    per_frame_ns = cpu * 1e9 / frames_done
    return {
        "speakers": speakers, "ticks": ticks - warm, "wall_s": ns / 1e9, "cpu_s": cpu,
        "us_per_speaker_frame": per_frame_ns / 1000,
        "wall_us_per_speaker_frame": ns / frames_done / 1000,
        "speakers_per_core": TICK_NS / per_frame_ns,
        "realtime_load_pct": 100.0 * cpu * 1e9 / ((ticks - warm) * TICK_NS),
        "decoded_frames": sum(s["frames"] for s in stats),
        "lost": sum(s["lost"] for s in stats),
        "decrypt_failures": sum(s["decrypt_failures"] for s in stats),
    }


def thread_cpu_s(tid: int) -> float:
    fields = pathlib.Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_socket(speakers: int, seconds: float, key: bytes, frames: list[bytes]) -> dict:
    ticks = int(seconds * FRAMES_PER_SECOND)
    rows = build(speakers, ticks, key, frames)
    conns = sorted({1 + s // PER_CONN for s in range(speakers)})
    pairs = {}
    for conn in conns:
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        rx.bind(("127.0.0.1", 0))
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.bind(("127.0.0.1", 0))
        rx.connect(tx.getsockname())
        tx.connect(rx.getsockname())
        rx.setblocking(False)
        pairs[conn] = (rx, tx)
    core = setup_core(speakers, key, {c: pairs[c][0].fileno() for c in conns})
    core.add_muxer(2, 200_000_000)
    for conn in conns:
        core.attach_muxer(conn, 2)
    drained = [0]
    stop = threading.Event()

    def drain():   # an output worker: muxer blocks come to Python once per tick
        while not stop.is_set():
            drained[0] += len(core.next_batch(0.1))
    worker = threading.Thread(target=drain)
    worker.start()
    core.start()
    tid = core.thread_native_id
    cpu0 = thread_cpu_s(tid)
    t0 = time.monotonic()
    for t, row in enumerate(rows):
        deadline = t0 + t * 0.020
        delay = deadline - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        for conn, _, _, wire in row:
            pairs[conn][1].send(wire)
    time.sleep(0.3)
    wall = time.monotonic() - t0
    cpu = thread_cpu_s(tid) - cpu0
    core.stop()
    stop.set()
    worker.join()
    stats = [core.conn_stats(c) for c in conns]
    received = sum(s["packets_received"] for s in stats)
    for rx, tx in pairs.values():
        rx.close()
        tx.close()
    load_fraction = cpu / wall
    return {
        "speakers": speakers, "seconds": wall, "receive_thread_cpu_s": cpu,
        "cpu_pct_of_one_core": 100 * load_fraction,
        "speakers_per_core": speakers / load_fraction if load_fraction else None,
        "packets_sent": speakers * ticks, "packets_received": received,
        "lost": sum(s["lost"] for s in stats), "late": sum(s["late"] for s in stats),
        "core": core.stats(),
    }


def bench_python_outputs(speakers: int, ticks: int, key: bytes, frames: list[bytes]) -> dict:
    """Per-user outputs: what the Python output worker pays per delivered frame (batch -> records ->
    AudioFrame -> Output), with a no-op callback output and with a WAV file output per user."""
    from telecom.receive import Receiver

    rows = build(speakers, ticks, key, frames)
    out = {"speakers": speakers, "ticks": ticks}
    for kind in ("callback", "wav"):
        core = setup_core(speakers, key)
        receiver = Receiver.__new__(Receiver)       # the dispatch logic without its threads
        receiver.core = core
        receiver._lock = threading.Lock()
        receiver._clients = {}
        receiver._muxers = {}
        receiver.clock_offset = 0.0
        tmp = pathlib.Path(os.environ.get("TMPDIR", "/tmp"))
        outputs = {}
        for s in range(speakers):
            conn, uid = 1 + s // PER_CONN, 1_000 + s
            core.set_deliver(conn, uid, True)
            outputs[(conn, uid)] = (Output.to_callback(lambda f: None) if kind == "callback"
                                    else Output.to_file(tmp / f"bench-recv-{s}.wav"))
        receiver._outputs = outputs
        spent = 0.0
        delivered = 0
        for t, row in enumerate(rows):
            core.run_ticks([[(c, w) for c, _, _, w in row]], t * TICK_NS, False)
            t0 = time.thread_time()
            records = core.next_batch(0)
            receiver._dispatch(records)
            spent += time.thread_time() - t0
            delivered += sum(1 for r in records if r[0] == "frame")
        for o in outputs.values():
            o.close()
        for s in range(speakers):
            (tmp / f"bench-recv-{s}.wav").unlink(missing_ok=True)
        out[f"{kind}_us_per_frame"] = spent / max(1, delivered) * 1e6
        out[f"{kind}_frames"] = delivered
    return out


def bench_jitter_twin(speakers: int, ticks: int) -> dict:
    payload = bytes(160)
    out = {}
    for name, mod in (("fast", fast_jitter), ("twin", twin_jitter)):
        buffers = [mod.JitterBuffer(3) for _ in range(speakers)]
        t0 = time.thread_time()
        for t in range(ticks):
            for s, jb in enumerate(buffers):
                jb.push((s * 1000 + t) & 0xFFFF, (t * 960) & 0xFFFFFFFF, payload, t * TICK_NS)
                jb.pop()
        out[name] = (time.thread_time() - t0) / (speakers * ticks) * 1e6
    native = fast_jitter.bench_push_pop(speakers, ticks) / (speakers * ticks) / 1000
    return {"speakers": speakers, "ticks": ticks, "fast_us_per_frame": out["fast"],
            "twin_us_per_frame": out["twin"], "twin_over_fast": out["twin"] / out["fast"],
            "native_c_us_per_frame": native, "twin_over_native_c": out["twin"] / native}


def bench_pure_python(speakers: int, ticks: int, key: bytes, frames: list[bytes]) -> dict | None:
    try:
        import opuslib
    except ImportError:
        return None
    rows = build(speakers, ticks, key, frames)
    cipher = TransportCipher(MODE, key)
    decoders = [opuslib.Decoder(48000, 2) for _ in range(speakers)]
    buffers = [twin_jitter.JitterBuffer(3) for _ in range(speakers)]
    acc = np.zeros(1920, dtype=np.int32)
    t0 = time.thread_time()
    for t, row in enumerate(rows):
        for s, (_, ssrc, _, wire) in enumerate(row):
            header, _, payload = cipher.open(wire)
            buffers[s].push(header.sequence, header.timestamp, payload, t * TICK_NS)
        acc[:] = 0
        for s in range(speakers):
            p = buffers[s].pop()
            if p.kind == "frame":
                pcm = decoders[s].decode(p.payload, 960)
                acc += np.frombuffer(pcm, dtype="<i2")
        np.clip(acc, -32768, 32767).astype("<i2").tobytes()
    per = (time.thread_time() - t0) / (speakers * ticks)
    return {"speakers": speakers, "ticks": ticks, "us_per_speaker_frame": per * 1e6,
            "speakers_per_core": 0.020 / per}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speakers", default="50,200,400")
    parser.add_argument("--seconds", type=float, default=5.0, help="simulated seconds per core run")
    parser.add_argument("--socket-seconds", type=float, default=5.0)
    parser.add_argument("--socket-speakers", type=int, default=200)
    args = parser.parse_args()
    key = os.urandom(32)
    frames = tone_frames(100)
    counts = [int(x) for x in args.speakers.split(",")]
    ticks = int(args.seconds * FRAMES_PER_SECOND)
    report: dict = {"machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                                "cpus": len(os.sched_getaffinity(0)), "libopus": opus.LIBOPUS_VERSION},
                    "mode": MODE, "core": [], "socket": None}
    print(f"{'scenario':<34}{'speakers':>9}{'us/frame':>10}{'per core':>10}{'load %':>8}")
    for n in counts:
        r = bench_core(n, ticks, key, frames)
        report["core"].append(r)
        print(f"{'core (no sockets, native)':<34}{n:>9}{r['us_per_speaker_frame']:>10.2f}"
              f"{r['speakers_per_core']:>10.0f}{r['realtime_load_pct']:>8.1f}")
    if args.socket_seconds > 0:
        r = bench_socket(args.socket_speakers, args.socket_seconds, key, frames)
        report["socket"] = r
        per_frame = 1e6 * r["receive_thread_cpu_s"] / (r["speakers"] * r["seconds"] * FRAMES_PER_SECOND)
        print(f"{'socket (epoll+recvmmsg, real time)':<34}{r['speakers']:>9}{per_frame:>10.2f}"
              f"{r['speakers_per_core'] or 0:>10.0f}{r['cpu_pct_of_one_core']:>8.1f}"
              f"   received {r['packets_received']}/{r['packets_sent']}, lost {r['lost']}")
    po = bench_python_outputs(50, 100, key, frames)
    report["python_outputs"] = po
    for kind in ("callback", "wav"):
        per = po[f"{kind}_us_per_frame"]
        print(f"{'per-user output (' + kind + '), py worker':<34}{po['speakers']:>9}{per:>10.2f}"
              f"{20_000 / per:>10.0f}   (users one output thread serves)")
    jt = bench_jitter_twin(200, 250)
    report["jitter"] = jt
    print(f"{'jitter buffer only, compiled (py API)':<34}{jt['speakers']:>9}{jt['fast_us_per_frame']:>10.2f}")
    print(f"{'jitter buffer only, pure-Python twin':<34}{jt['speakers']:>9}{jt['twin_us_per_frame']:>10.2f}"
          f"   twin/fast = {jt['twin_over_fast']:.1f}x")
    print(f"{'jitter buffer only, C loop (no GIL)':<34}{jt['speakers']:>9}"
          f"{jt['native_c_us_per_frame']:>10.3f}   twin/C = {jt['twin_over_native_c']:.0f}x")
    py = bench_pure_python(50, 100, key, frames)
    report["pure_python"] = py
    if py:
        print(f"{'pure Python (AES open+opuslib+twin)':<34}{py['speakers']:>9}"
              f"{py['us_per_speaker_frame']:>10.2f}{py['speakers_per_core']:>10.0f}")
        native = report["core"][-1]["us_per_speaker_frame"]
        report["python_over_native"] = py["us_per_speaker_frame"] / native
        print(f"pure Python / native per speaker-frame: {report['python_over_native']:.1f}x")
    out = HERE / "results" / "receive.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
