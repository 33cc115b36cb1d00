"""The main demo (``./scripts/demo``, or ``python -m telecom.demo``): telecom end to end, offline.

It starts the local voice server (``telecom.testing``) on loopback over wss with DAVE on, as Discord
runs voice channels today, and joins two bots with :class:`telecom.Client` exactly as they would join
Discord (credentials from the server instead of the main gateway). Bot A plays a tone through a PCM
pipe at 100 % and another at 50 %, then a tone file (an MP3 written with PyAV into a temp dir and
served by a loopback aiohttp server) through ``Playable.from_url``. Bot B says something too, and
records A to one file and the whole channel (itself included) through a muxer to another.

It prints what the server saw (DAVE frames it cannot decode: end-to-end encryption works), what B
heard (frequency, level and duration of each tone, decoded from B's recording), the DAVE epoch and
privacy code both bots agree on, and both clients' stats. Exit status 0 and ``demo OK`` when
everything heard is what was played.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

import numpy as np

from telecom import Client, Output, Playable
from telecom.testing import LocalVoiceServer

SAMPLE_RATE = 48000


def tone(seconds: float, freq: float, level: float = 0.4) -> bytes:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    mono = np.round(32767 * level * np.sin(2 * np.pi * freq * t)).astype("<i2")
    return np.repeat(mono, 2).tobytes()


def segments(x: np.ndarray, threshold: float = 1500.0) -> list[tuple[int, int]]:
    """(start, end) sample indices of the loud runs of 20 ms windows."""
    n = len(x) // 960
    env = np.sqrt(np.mean(np.square(x[: n * 960].reshape(n, 960)), axis=1))
    loud = np.append(env > threshold, False)
    out, start = [], None
    for i, flag in enumerate(loud):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            if i - start >= 5:  # ignore blips shorter than 100 ms
                out.append((start * 960, i * 960))
            start = None
    return out


def analyse(x: np.ndarray) -> tuple[float, float]:
    """(peak frequency in Hz, RMS in dBFS) of a mono float signal."""
    x = x[len(x) // 10 : len(x) - len(x) // 10]  # skip the codec's ramps at both ends
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    k = int(np.argmax(spectrum[1:-1])) + 1
    a, b, c = np.log(spectrum[k - 1 : k + 2] + 1e-12)
    freq = (k + 0.5 * (a - c) / (a - 2 * b + c)) * SAMPLE_RATE / len(x)
    rms = float(np.sqrt(np.mean(np.square(x))))
    return float(freq), 20 * np.log10(max(rms, 1e-9) / 32768)


def write_tone_file(path: str, seconds: float, freq: float, level: float = 0.4) -> None:
    """An MP3 of a sine, encoded with PyAV (the same library that decodes it on the way out)."""
    from fractions import Fraction

    import av

    with av.open(path, "w", format="mp3") as out:
        stream = out.add_stream("libmp3lame", rate=SAMPLE_RATE)
        stream.layout = "stereo"
        stream.bit_rate = 128000
        size = stream.codec_context.frame_size or 1152
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        mono = (level * np.sin(2 * np.pi * freq * t)).astype(np.float32)
        for start in range(0, len(mono), size):
            block = np.ascontiguousarray(np.tile(mono[start : start + size], (2, 1)))
            frame = av.AudioFrame.from_ndarray(block, format="fltp", layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = SAMPLE_RATE, start, Fraction(1, SAMPLE_RATE)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


class FileServer:
    """A directory on a loopback aiohttp server (in its own thread; static files with Range support)."""

    def __init__(self, directory: str) -> None:
        import asyncio

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


def play_pcm(client: Client, seconds: float, freq: float) -> Playable:
    pipe = client.play(Playable.from_pcm_pipe())
    pipe.send(tone(seconds, freq))
    pipe.close()
    return pipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize"],
                        help="restrict the server to one transport mode")
    parser.add_argument("--no-dave", action="store_true", help="a transport-only channel (like a stage)")
    parser.add_argument("--out", default="demo-recordings",
                        help="directory for B's recordings (A alone, and the muxed channel)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    server = LocalVoiceServer(dave=not args.no_dave, tls=True, modes=[args.mode] if args.mode else None)
    server.start_background()
    guild_id, channel_id, alice, bob = 111, 222, 333, 444
    print(f"local voice server: wss://{server.endpoint} (CA {server.ca_file}), "
          f"DAVE {'off' if args.no_dave else 'on'}")

    clients: dict[int, Client] = {}
    t0 = time.monotonic()
    for user in (alice, bob):
        creds = server.create_session(guild_id, channel_id, user)
        c = Client(user, guild_id, creds.session_id, channel_id=channel_id, ssl=server.ca_file)
        c.set_server_info(creds.endpoint, creds.token)
        clients[user] = c
    for c in clients.values():
        c.wait_ready(10)
    a, b = clients[alice], clients[bob]
    events: list[str] = []
    a.on("*", lambda e: events.append(e.name))
    print(f"two bots joined in {(time.monotonic() - t0) * 1000:.0f} ms: "
          f"mode {a.stats()['mode']}, ssrc A {a.stats()['ssrc']}, B {b.stats()['ssrc']}")

    if not args.no_dave:  # both bots must be in the same MLS group before E2EE audio can flow
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            sa, sb = a.stats(), b.stats()
            if sa.get("dave_encrypting") and sb.get("dave_encrypting") and sa["epoch"] == sb["epoch"]:
                break
            time.sleep(0.05)
        print(f"DAVE: epoch {a.stats()['epoch']}, privacy code A {a.voice_privacy_code}, "
              f"B {b.voice_privacy_code}")

    # B records A alone, and everyone (itself included) through a muxer.
    a_path = os.path.join(args.out, "alice.wav")
    mix_path = os.path.join(args.out, "everyone.wav")
    a_file = b.get_user(alice).set_output(Output.to_file(a_path))
    muxer = Output.muxer(include_self=True)
    mix_file = muxer.set_output(Output.to_file(mix_path))
    b.set_output_muxer(muxer)

    plan = [("A: PCM pipe, 100 %", 440.0, 100), ("A: PCM pipe, 50 %", 660.0, 50)]
    for _, freq, volume in plan:
        a.set_volume(volume)
        play_pcm(a, 1.0, freq).done.result(5)
        time.sleep(0.4)
    a.set_volume(100)
    with tempfile.TemporaryDirectory() as tmp:
        write_tone_file(os.path.join(tmp, "tone-550.mp3"), 1.0, 550.0)
        files = FileServer(tmp)
        try:
            url = f"http://127.0.0.1:{files.port}/tone-550.mp3"
            track = a.play(Playable.from_url(url))
            track.done.result(10)
        finally:
            files.close()
    plan.append((f"A: from_url ({track.codec})", 550.0, 100))
    time.sleep(0.3)
    play_pcm(b, 0.8, 330.0).done.result(5)  # B talks too: only in the muxer (include_self)
    time.sleep(0.5)

    # What the SFU saw of A: DAVE frames (… FA FA) it cannot decode.
    record = server.record(alice)
    audio = record.audio_packets()
    dave_frames = sum(p.payload.endswith(b"\xfa\xfa") for p in audio)
    print(f"server saw {len(audio)} audio packets from A, {dave_frames} of them DAVE frames"
          + ("" if args.no_dave else " (end-to-end encrypted: the server cannot decode them)"))

    b.set_output_muxer(None)
    muxer.close()
    a_file.close()
    import soundfile

    heard, rate = soundfile.read(a_path, dtype="int16")
    left = heard[:, 0].astype(np.float64)
    found = segments(left)
    ok = len(found) == len(plan)
    print(f"B heard A ({a_path}, {len(left) / rate:.2f} s):")
    levels = []
    for (label, want, _), (s, e) in zip(plan, found):
        freq, level = analyse(left[s:e])
        levels.append(level)
        good = abs(freq - want) < 3 and abs((e - s) / rate - 1.0) < 0.06
        ok &= good
        print(f"  {label}: {freq:.1f} Hz (played {want:.0f}), {level:.1f} dBFS, {(e - s) / rate:.2f} s"
              f" {'ok' if good else 'WRONG'}")
    if len(levels) >= 2:
        drop = levels[0] - levels[1]
        ok &= 5.0 < drop < 7.0
        print(f"  volume 100 % -> 50 %: {drop:.2f} dB quieter (expected 6.02)")

    mix, _ = soundfile.read(mix_path, dtype="int16")
    mixed = segments(mix[:, 0].astype(np.float64))
    mix_freqs = [analyse(mix[s:e, 0].astype(np.float64))[0] for s, e in mixed]
    want_mix = [f for _, f, _ in plan] + [330.0]
    mix_ok = len(mix_freqs) == len(want_mix) and all(abs(f - w) < 3 for f, w in zip(mix_freqs, want_mix))
    ok &= mix_ok
    print(f"B's muxer ({mix_path}): tones at " + ", ".join(f"{f:.0f}" for f in mix_freqs)
          + f" Hz, in order on one timeline {'ok' if mix_ok else 'WRONG'}")

    for name, c in (("A", a), ("B", b)):
        s = c.stats()
        keys = ("frames_sent", "passthrough_frames", "silence_frames_sent", "underruns", "late",
                "packets_received", "frames_decoded", "concealed", "epoch", "dave_encrypted",
                "dave_decrypted", "latency_ms")
        print(f"{name} stats:", {k: s[k] for k in keys if k in s})
    violations = server.violations()
    print("server validation:", "no violations" if not violations else violations)
    ok &= not violations and (args.no_dave or dave_frames == len(audio) > 0)
    for c in clients.values():
        c.close()
    server.stop_background()
    print("demo", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
