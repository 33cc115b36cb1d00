"""The main demo (``./scripts/demo``, or ``python -m telecom.demo``): telecom end to end, offline.

It starts the local voice server (``telecom.testing``) on loopback, joins a bot with
:class:`telecom.Client` exactly as it would join Discord (credentials from the server instead of the
main gateway), plays a two-tone melody through a PCM pipe at two volumes, then a tone file (written with
PyAV into a temp dir and served by a loopback aiohttp server) through ``Playable.from_url``, and prints
what the server heard — decoded with its own, independent Opus decoder — and the client's stats.

The server's recording of the bot is written to ``--out`` (default ``demo-heard.wav``) when soundfile
is installed. Receiving audio on the client side is not built yet (see the README).
"""

from __future__ import annotations

import argparse
import math
import struct
import sys
import time

from telecom import Client, Playable
from telecom.testing import LocalVoiceServer

SILENCE = b"\xf8\xff\xfe"


def tone(seconds: float, freq: float, level: float = 0.4) -> bytes:
    n = int(seconds * 48000)
    out = bytearray()
    for i in range(n):
        v = int(32767 * level * math.sin(2 * math.pi * freq * i / 48000))
        out += struct.pack("<hh", v, v)
    return bytes(out)


def analyse(pcm: bytes) -> tuple[float, float]:
    """(dominant frequency by zero crossings, RMS in dBFS) of the left channel's loud part."""
    samples = struct.unpack(f"<{len(pcm) // 2}h", pcm)[::2]
    loud = [i for i, s in enumerate(samples) if abs(s) > 300]
    if not loud:
        return 0.0, -120.0
    part = samples[loud[0] + 2400 : loud[-1] - 2400] or samples
    crossings = sum(1 for a, b in zip(part, part[1:]) if a < 0 <= b)
    freq = crossings * 48000 / len(part)
    rms = math.sqrt(sum(s * s for s in part) / len(part))
    return freq, 20 * math.log10(max(rms, 1e-9) / 32768)


def write_tone_file(path: str, seconds: float, freq: float, level: float = 0.4) -> None:
    """An MP3 of a sine, encoded with PyAV (the same library that decodes it on the way out)."""
    from fractions import Fraction

    import av
    import numpy as np

    with av.open(path, "w", format="mp3") as out:
        stream = out.add_stream("libmp3lame", rate=48000)
        stream.layout = "stereo"
        stream.bit_rate = 128000
        size = stream.codec_context.frame_size or 1152
        t = np.arange(int(seconds * 48000)) / 48000
        mono = (level * np.sin(2 * np.pi * freq * t)).astype(np.float32)
        for start in range(0, len(mono), size):
            block = np.ascontiguousarray(np.tile(mono[start : start + size], (2, 1)))
            frame = av.AudioFrame.from_ndarray(block, format="fltp", layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = 48000, start, Fraction(1, 48000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


class FileServer:
    """A directory on a loopback aiohttp server (in its own thread; static files with Range support)."""

    def __init__(self, directory: str) -> None:
        import asyncio
        import threading

        from aiohttp import web

        self._loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_static("/", directory)
        self._runner = web.AppRunner(app)
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="demo-file-server", daemon=True)
        self._thread.start()
        ready.wait(5)

    def close(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize"],
                        help="restrict the server to one transport mode")
    parser.add_argument("--out", default="demo-heard.wav", help="where to write what the server heard")
    args = parser.parse_args(argv)

    server = LocalVoiceServer(dave=False, tls=True, modes=[args.mode] if args.mode else None)
    server.start_background()
    guild_id, channel_id, user_id = 111, 222, 333
    creds = server.create_session(guild_id, channel_id, user_id)
    print(f"local voice server: wss://{creds.endpoint} (CA {server.ca_file})")

    t0 = time.monotonic()
    client = Client(user_id, guild_id, creds.session_id, channel_id=channel_id, ssl=server.ca_file)
    client.on("*", lambda e: print(f"  event {e.name}: "
                                    f"{ {k: v for k, v in e.data.items() if k != 'playable'} }"))
    client.set_server_info(creds.endpoint, creds.token)
    client.wait_ready(10)
    print(f"joined in {(time.monotonic() - t0) * 1000:.0f} ms: ssrc {client.stats()['ssrc']}, "
          f"mode {client.stats()['mode']}")

    results = []
    for freq, volume in ((440.0, 100), (660.0, 50)):
        client.set_volume(volume)
        before = len(server.record(user_id).packets)
        pipe = Playable.from_pcm_pipe()
        pipe.send(tone(1.0, freq))
        pipe.close()
        client.play(pipe)
        pipe.done.result(5)
        server.wait_for_sync(lambda: server.record(user_id).speaking_events[-1][1] == 0, 3)
        record = server.record(user_id)
        heard = record.copy()
        heard.packets = record.packets[before:]
        f, level = analyse(heard.pcm())
        results.append((freq, volume, f, level))
        print(f"played {freq:.0f} Hz at {volume} %: server heard {len(heard.packets)} packets, "
              f"{f:.1f} Hz at {level:.1f} dBFS")

    # A file through Playable.from_url: fetched over HTTP, decoded by PyAV in a decode thread.
    import os
    import tempfile

    client.set_volume(100)
    with tempfile.TemporaryDirectory() as tmp:
        write_tone_file(os.path.join(tmp, "tone-550.mp3"), 1.0, 550.0)
        files = FileServer(tmp)
        try:
            url = f"http://127.0.0.1:{files.port}/tone-550.mp3"
            before = len(server.record(user_id).packets)
            track = client.play(Playable.from_url(url))
            track.done.result(10)
            server.wait_for_sync(lambda: server.record(user_id).speaking_events[-1][1] == 0, 3)
        finally:
            files.close()
    record = server.record(user_id)
    heard = record.copy()
    heard.packets = record.packets[before:]
    f, level = analyse(heard.pcm())
    file_ok = abs(f - 550.0) < 5 and track.end_reason == "finished"
    print(f"played {url} ({track.codec}, {track.duration:.2f} s, {track.end_reason}): server heard "
          f"{len(heard.packets)} packets, {f:.1f} Hz at {level:.1f} dBFS")

    stats = client.stats()
    violations = server.violations(user_id)
    print("client stats:", {k: stats[k] for k in ("frames_sent", "silence_frames_sent", "underruns",
                                                  "late", "max_late_ms", "latency_ms")})
    print("server validation:", "no violations" if not violations else violations)
    drop = results[0][3] - results[1][3]
    print(f"volume 100 % -> 50 %: {drop:.2f} dB quieter (expected 6.02)")
    try:
        import soundfile

        import numpy as np

        pcm = np.frombuffer(server.record(user_id).pcm(), dtype="<i2").reshape(-1, 2)
        soundfile.write(args.out, pcm, 48000)
        print(f"what the server heard: {args.out}")
    except ImportError:
        pass
    client.close()
    time.sleep(0.1)
    server.stop_background()
    ok = (not violations and all(abs(f - want) < 5 for want, _, f, _ in results) and 5.0 < drop < 7.0
          and file_ok)
    print("demo", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
