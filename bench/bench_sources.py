"""URL/file source costs: decode CPU per stream-second by format, time to first audio over loopback HTTP,
and memory per decoding track. Standalone (``python bench/bench_sources.py [--quick]``); prints a table
and writes ``bench/results/sources.json``.

The decode worker runs for real (``telecom.sources.decode.run_track``: HTTP fetch, PyAV demux/decode,
resample to 48 kHz s16 stereo, frame batching); only the native ring is replaced by a Python stand-in that
drains at a chosen speed, so the engine and the network clock do not limit the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import media  # noqa: E402  (tests/media.py: tone files and the loopback HTTP server)


class Ring:
    """Stands in for the native PCM ring: drains at ``speed`` x real time (inf: takes everything)."""

    def __init__(self, capacity: int, wake: threading.Condition, speed: float) -> None:
        self.capacity, self.buffered, self.frames_played = capacity, 0, 0
        self.state, self.ended, self.total, self.first_write = "playing", False, 0, None
        self._speed, self._wake, self._lock = speed, wake, threading.Lock()
        if speed != float("inf"):
            threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        last = time.monotonic()
        while not (self.ended and self.buffered == 0):
            time.sleep(0.005)
            now = time.monotonic()
            with self._lock:
                frames = min(self.buffered // 3840, int((now - last) * 192000 * self._speed) // 3840)
                self.buffered -= frames * 3840
                self.frames_played += frames
                if frames:
                    last = now
            if frames:
                with self._wake:
                    self._wake.notify_all()

    def write(self, view, partial=False):
        if self.first_write is None:
            self.first_write = time.monotonic()
        with self._lock:
            room = len(view) if self._speed == float("inf") else self.capacity - self.buffered
            n = min(len(view), room)
            if self._speed != float("inf"):
                self.buffered += n
            self.total += n
            return n

    def end_input(self):
        self.ended = True

    def stop(self):
        self.state, self.ended, self.buffered = "stopped", True, 0

    def clear(self):
        with self._lock:
            self.buffered = 0


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def main(argv: list[str] | None = None) -> int:
    from telecom import Playable
    from telecom.sources.decode import run_track

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short files, few tracks")
    args = parser.parse_args(argv)
    seconds = 10.0 if args.quick else 60.0
    tracks = 8 if args.quick else 50
    tmp = tempfile.mkdtemp()
    kinds = ["mp3", "vorbis", "opus", "flac", "wav", "m4a"]
    files = {k: media.tone_file(tmp, k, seconds, 440.0) for k in kinds}
    served = {os.path.basename(p): open(p, "rb").read() for p in files.values()}
    results: dict = {"seconds_per_file": seconds, "formats": {}}
    with media.MediaServer(served) as server:
        print(f"{'format':8} {'CPU ms / stream-s':>18} {'x real time':>12} {'first audio ms':>15}")
        for kind in kinds:
            url = server.url(f"/f/{os.path.basename(files[kind])}")
            track = Playable.from_url(url, passthrough=False)
            ring = Ring(track._source.capacity, track._cond, float("inf"))
            track._source = ring
            t0, c0 = time.monotonic(), time.thread_time()
            run_track(track)            # this thread: thread_time counts the worker only
            cpu, wall = time.thread_time() - c0, time.monotonic() - t0
            assert track.error is None, track.error
            audio = ring.total / 192000
            row = {"cpu_ms_per_stream_second": cpu * 1000 / audio, "realtime_factor": audio / wall,
                   "first_audio_ms": (ring.first_write - t0) * 1000, "audio_seconds": audio}
            results["formats"][kind] = row
            print(f"{kind:8} {row['cpu_ms_per_stream_second']:18.2f} {row['realtime_factor']:12.0f} "
                  f"{row['first_audio_ms']:15.1f}")
        # Memory per decoding track: N tracks streaming at real time, rings full (ahead 5 s each).
        base = rss_kib()
        running = []
        for _ in range(tracks):
            track = Playable.from_url(server.url(f"/f/{os.path.basename(files['mp3'])}"))
            native_capacity = track._source.capacity
            ring = Ring(native_capacity, track._cond, 1.0)
            track._source = ring
            thread = threading.Thread(target=run_track, args=(track,), daemon=True)
            thread.start()
            running.append((track, ring, thread))
        time.sleep(3.0)
        per_track = (rss_kib() - base) / tracks
        for track, _ring, _thread in running:
            track.stop()
        for _track, _ring, thread in running:
            thread.join(5)
        # An hour of audio through one decode worker at a 300x clock: resident memory over time.
        hour = 600 if args.quick else 3600
        track = Playable.from_url(server.url(f"/sine/{hour}.wav"), ahead_seconds=5.0)
        ring = Ring(track._source.capacity, track._cond, 300.0)
        track._source = ring
        samples: list[tuple[float, int]] = []
        worker = threading.Thread(target=run_track, args=(track,), daemon=True)
        t0 = time.monotonic()
        worker.start()
        while worker.is_alive():
            samples.append((ring.total / 192000, rss_kib()))
            time.sleep(0.25)
        wall = time.monotonic() - t0
        early = [kib for at, kib in samples if 60 <= at <= 300] or [samples[0][1]]
        late = [kib for at, kib in samples if at >= hour - 300] or [samples[-1][1]]
        results["long_track"] = {"audio_seconds": ring.total / 192000, "wall_seconds": wall,
                                 "rss_kib_minutes_1_to_5": max(early), "rss_kib_last_5_minutes": max(late),
                                 "max_ahead_seconds": track.max_ahead_seconds}
        print(f"{ring.total / 192000:.0f} s of audio through one worker in {wall:.1f} s: RSS "
              f"{max(early)} KiB (minutes 1-5) -> {max(late)} KiB (last 5 minutes), "
              f"decoder at most {track.max_ahead_seconds:.2f} s ahead (ahead_seconds=5)")
    ring_kib = native_capacity / 1024
    results["memory"] = {"tracks": tracks, "python_side_kib_per_track": per_track,
                         "native_ring_kib_per_track": ring_kib}
    print(f"memory: {per_track:.0f} KiB per decoding mp3 track (PyAV, HTTP, thread) "
          f"+ {ring_kib:.0f} KiB native ring at ahead_seconds=5 ({tracks} tracks)")
    out = os.path.join(HERE, "results", "sources.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
