"""The C ABI: libtelecom.so built with the documented command, C programs compiled with gcc, run against
the local voice server; what the server decoded (its own opuslib) is checked, plus the error paths, the
environment lookup (baked-in venv, TELECOM_VENV) and an AddressSanitizer run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from audio_checks import left_channel, peak_frequency, rms_db, stereo_tone
from conftest import join_watcher, new_ids
from telecom import Client, Playable
from telecom.testing import LocalVoiceServer

HERE = Path(__file__).resolve().parent
CAPI_SOURCES = HERE / "capi"

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed: cannot compile "
                                                                    "the C test programs")


def build_library(out: Path, *extra: str) -> Path:
    """The documented build command."""
    subprocess.run([sys.executable, "-m", "telecom.capi.build", "--out", str(out), *extra],
                   check=True, capture_output=True, timeout=300)
    return out


def compile_program(source: str, lib_dir: Path, out: Path, *flags: str) -> Path:
    subprocess.run(["gcc", "-O1", "-g", "-Wall", "-Wextra", "-Werror", *flags, "-o", str(out),
                    str(CAPI_SOURCES / source), f"-I{lib_dir}", f"-L{lib_dir}", "-ltelecom",
                    f"-Wl,-rpath,{lib_dir}", "-lm", "-lpthread"], check=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def capi(tmp_path_factory):
    base = tmp_path_factory.mktemp("capi")
    lib = build_library(base / "lib")
    return {
        "lib": lib,
        "play": compile_program("play.c", lib, base / "play"),
        "seed": compile_program("seed.c", lib, base / "seed"),
        "base": base,
    }


def run(program: Path, *args: str, env: dict | None = None,
        timeout: float = 90) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([str(program), *args], capture_output=True, text=True, timeout=timeout,
                           env=full_env)


def lines(stdout: str, prefix: str) -> list[str]:
    return [line[len(prefix):] for line in stdout.splitlines() if line.startswith(prefix)]


def tone_windows(pcm: bytes) -> list[tuple[float, float, float]]:
    """(start s, frequency Hz, RMS dBFS) of every loud 100 ms window of the left channel."""
    x = left_channel(pcm)
    out = []
    for i in range(0, len(x) - 4800, 4800):
        w = x[i:i + 4800]
        if np.abs(w).max() > 500:
            out.append((i / 48000, peak_frequency(w), rms_db(w)))
    return out


def run_speaking_at(cmd: list[str], marker: str, speaker: Client) -> tuple[str, str]:
    """Run a C program; when it prints a line starting with ``marker``, ``speaker`` says 1.5 s of
    523 Hz (for the program to record). Asserts exit status 0; returns (stdout, stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_lines = []
    for line in proc.stdout:
        out_lines.append(line)
        if line.startswith(marker):
            pipe = Playable.from_pcm_pipe()
            pipe.send(stereo_tone(1.5, 523.0))
            pipe.close()
            speaker.play(pipe)
    stderr = proc.stderr.read()
    assert proc.wait(60) == 0, "".join(out_lines) + stderr
    return "".join(out_lines), stderr


def play_args(server, creds, ca: str | None = None) -> list[str]:
    endpoint = server.endpoint if server.tls else server.url
    return [endpoint, creds.token, ca or "", str(creds.user_id), str(creds.guild_id),
            str(creds.channel_id), creds.session_id]


def check_played_tones(server, user: int, *, more_audio: bool = False) -> None:
    """440 Hz at -6 dBFS peak (-9 dB RMS) with a pause, then 660 Hz at client volume 50 % (-6 dB)."""
    windows = tone_windows(server.record(user).pcm())
    a = [w for w in windows if abs(w[1] - 440) < 3]
    b = [w for w in windows if abs(w[1] - 660) < 3]
    assert len(a) >= 15 and len(b) >= 11, windows
    assert max(w[0] for w in a) < min(w[0] for w in b)  # in that order
    level_a = float(np.median([w[2] for w in a]))
    level_b = float(np.median([w[2] for w in b]))
    assert level_a == pytest.approx(-6.0 - 3.01, abs=1.0)
    assert level_b - level_a == pytest.approx(-6.02, abs=0.5)
    record = server.record(user)
    # The pause: Speaking went to 0 and back to 1 during the first tone.
    flags = [f & 1 for _, f in record.speaking_events]
    assert flags[:3] == [1, 0, 1], record.speaking_events
    # 2 s + 1.5 s of tone = 175 audio frames; the pause cost no audio.
    frames = sum(1 for p in record.packets if not p.is_silence)
    assert frames >= 175 if more_audio else frames == 175
    assert server.violations(user) == []


def test_c_program_plays_pauses_and_changes_volume_over_wss(capi, tmp_path):
    """play.c over wss with the server's CA passed as argv; file/receive steps checked either way."""
    server = LocalVoiceServer(dave=False, tls=True, heartbeat_interval=1.0)
    server.start_background()
    try:
        guild, channel, user = new_ids()
        other = user + 100
        creds = server.create_session(guild, channel, user)
        # Another member speaks, for the recording step.
        speaker_creds = server.create_session(guild, channel, other)
        speaker = Client(other, guild, speaker_creds.session_id, channel_id=channel, ssl=server.ca_file)
        speaker.set_server_info(server.endpoint, speaker_creds.token)
        speaker.wait_ready(10)
        media = tmp_path / "tone880.wav"
        _write_wav(media, stereo_tone(1.0, 880.0))
        opus_packets = _opus_packets(stereo_tone(1.0, 330.0))
        opus_file = tmp_path / "packets.bin"
        opus_file.write_bytes(b"".join(len(p).to_bytes(2, "little") + p for p in opus_packets))
        record_path = tmp_path / "heard.wav"
        mux_path = tmp_path / "everyone.wav"

        stdout, _ = run_speaking_at(
            [str(capi["play"]), *play_args(server, creds, server.ca_file), "--file", str(media),
             "--opus", str(opus_file), "--record", str(other), str(record_path), "--mux", str(mux_path)],
            "record status=TELECOM_OK", speaker)
        speaker.close()

        assert lines(stdout, "version ") == ["0.1.0"]
        checks = {c.split()[0]: c for c in lines(stdout, "check ")}
        assert "status=TELECOM_E_INVALID error=create_client: session_id must not be NULL" in \
            checks["create_client_null_session"]
        assert "volume must be 0..200" in checks["client_set_volume_500"]
        assert "status=TELECOM_E_IO" in checks["client_set_server_info_bad_ca"]
        assert "status=TELECOM_E_FULL" in stdout and "more do not fit" in stdout
        assert "not a live telecom_playable handle" in checks["stale_playable"]
        assert "not a live telecom_client handle" in checks["stale_client"]
        assert "status=TELECOM_E_TIMEOUT" in checks["playable_wait_done_short"]
        assert "status=TELECOM_E_INVALID" in checks["other_thread_bad_volume"]
        assert "status=TELECOM_OK error=" in checks["thread_local_error"]

        events = [e.split(" ", 1) for e in lines(stdout, "event ")]
        names = [name for name, _ in events]
        assert "ready" in names and names.count("track_start") >= 2 and names.count("track_end") >= 2
        assert '"mode":"aead_' in dict(events)["ready"]
        # Every polled event went through the callback first (later ones may be in flight).
        assert int(lines(stdout, "callback_events ")[0]) >= len(events)
        assert '"frames_sent":' in lines(stdout, "stats ")[0]

        has_sources = hasattr(Playable, "from_url")
        from_url = lines(stdout, "from_url ")[0]
        if has_sources:
            assert from_url == "status=TELECOM_OK played"
            windows = tone_windows(server.record(user).pcm())
            assert sum(1 for w in windows if abs(w[1] - 880) < 3) >= 7
        else:
            assert from_url.startswith("status=TELECOM_E_UNSUPPORTED") and "Playable.from_url" in from_url

        has_opus = hasattr(Playable, "from_opus_pipe")
        opus = lines(stdout, "opus ")[0]
        if has_opus:
            assert opus == f"status=TELECOM_OK sent={len(opus_packets)}"
            assert "status=TELECOM_E_INVALID" in checks["opus_send_garbage"]
            # Alone at 100 %: the packets went to the wire byte for byte, in order — all but the first,
            # which the engine may still decode and re-encode (the client volume has just ramped back
            # from 50 % to 100 %, and switching paths loses no frame).
            payloads = [p.payload for p in server.record(user).packets]
            start = payloads.index(opus_packets[1])
            assert payloads[start:start + len(opus_packets) - 1] == opus_packets[1:]
        else:
            assert opus.startswith("status=TELECOM_E_UNSUPPORTED")

        record = lines(stdout, "record ")[0]
        muxer = lines(stdout, "muxer ")[0]
        try:
            import telecom.output  # noqa: F401
            has_receive = True
        except ImportError:
            has_receive = False
        if has_receive:
            assert record == "status=TELECOM_OK error=" and muxer == "status=TELECOM_OK error="
            # Both files are complete once the C calls that stop them return: the other user's tone.
            for path in (record_path, mux_path):
                assert sum(1 for w in tone_windows(_read_wav(path)) if abs(w[1] - 523) < 3) >= 8, path
        else:
            assert record.startswith("status=TELECOM_E_UNSUPPORTED") and "receive path" in record
            assert muxer.startswith("status=TELECOM_E_UNSUPPORTED")
        assert "recorded" in stdout

        check_played_tones(server, user, more_audio=has_sources or has_opus)
    finally:
        server.stop_background()


def test_seed_example_compiles_and_runs_with_the_seed_names(capi, voice_server):
    guild, channel, user = new_ids()
    creds = voice_server.create_session(guild, channel, user)
    proc = run(capi["seed"], voice_server.url, creds.token, str(user), str(guild), creds.session_id)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pipe_send TELECOM_OK" in proc.stdout and proc.stdout.rstrip().endswith("done")
    # The seed's URL is not reachable offline: the track is created, then ends with an error event.
    expected = "TELECOM_OK" if hasattr(Playable, "from_url") else "TELECOM_E_UNSUPPORTED"
    assert lines(proc.stdout, "from_url ")[0].startswith(expected)

    # A refused Identify (wrong token, close 4004) reaches C as TELECOM_E_CONNECTION with the code.
    creds = voice_server.create_session(guild, channel, user)
    proc = run(capi["seed"], voice_server.url, "wrong-token", str(user), str(guild), creds.session_id)
    assert proc.returncode == 4
    assert "not ready: TELECOM_E_CONNECTION" in proc.stdout and "4004" in proc.stdout, proc.stdout


def test_a_host_that_exits_with_everything_live_exits_cleanly(capi, voice_server, tmp_path):
    """exit_early.c returns from main with its client, a starting track and a recording still live. The
    library's exit hook closes the client properly — the others see the member leave at once (close
    1000) rather than after the server's 15 s grace for a dropped, resumable connection — and stops
    telecom's threads before exit() unloads libraries: a decode thread still loading PyAV while exit()
    ran library destructors aborted with heap corruption in some runs (CI, stop 14: seed.c)."""
    if not hasattr(Playable, "from_url"):
        pytest.skip("this build has no URL/file sources")
    program = compile_program("exit_early.c", capi["lib"], tmp_path / "exit_early")
    guild, channel, user = new_ids()
    other = user + 100
    speaker, _, wait_left = join_watcher(voice_server, guild, channel, other)
    media = tmp_path / "tone880.wav"
    _write_wav(media, stereo_tone(1.0, 880.0))
    record_path = tmp_path / "heard.wav"
    creds = voice_server.create_session(guild, channel, user)
    try:
        stdout, stderr = run_speaking_at(
            [str(program), voice_server.url, creds.token, str(user), str(guild), str(channel),
             creds.session_id, str(other), str(record_path), str(media)], "recording", speaker)
        assert wait_left(user), "the C host's exit left its voice session dangling"
    finally:
        speaker.close()
    assert stdout.endswith("exiting\n")
    assert "corrupt" not in stderr and "double free" not in stderr, stderr
    # The recording is a valid file holding the other user's tone.
    assert sum(1 for w in tone_windows(_read_wav(record_path)) if abs(w[1] - 523) < 3) >= 8


def test_address_sanitizer_run_is_clean(capi, voice_server):
    """play.c built with -fsanitize=address (plain ws this time). ASan's leak checker is off: the embedded
    interpreter is never finalised by design, so its allocations are still reachable at exit."""
    try:
        program = compile_program("play.c", capi["lib"], capi["base"] / "play_asan",
                                  "-fsanitize=address", "-fno-omit-frame-pointer")
    except subprocess.CalledProcessError:
        pytest.skip("gcc cannot build with -fsanitize=address here (libasan missing)")
    assert "libasan" in subprocess.run(["ldd", str(program)], capture_output=True, text=True).stdout
    guild, channel, user = new_ids()
    creds = voice_server.create_session(guild, channel, user)
    proc = run(program, *play_args(voice_server, creds),
               env={"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:halt_on_error=1"})
    assert "AddressSanitizer" not in proc.stderr, proc.stderr[-4000:]
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.rstrip().endswith("done")
    check_played_tones(voice_server, user)


def test_address_sanitizer_reports_errors_in_this_setup(capi, voice_server):
    """The control for the clean run above: a deliberate overflow in play.c is reported."""
    program = capi["base"] / "play_asan"
    if not program.exists():
        pytest.skip("no AddressSanitizer build (see test_address_sanitizer_run_is_clean)")
    guild, channel, user = new_ids()
    creds = voice_server.create_session(guild, channel, user)
    proc = run(program, *play_args(voice_server, creds),
               env={"ASAN_OPTIONS": "detect_leaks=0", "TELECOM_TEST_ASAN_CANARY": "1"})
    assert proc.returncode != 0 and "heap-buffer-overflow" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("sanitize", [False, True], ids=["plain", "asan"])
def test_many_threads_share_a_client(capi, voice_server, sanitize):
    """4 C threads create/play/feed/pause/stop/destroy 50 pipes each on one client while another waits
    for events: every call succeeds, every error message is the calling thread's own, and every
    track_start/track_end event is delivered."""
    flags = ("-fsanitize=address", "-fno-omit-frame-pointer") if sanitize else ()
    try:
        program = compile_program("threads.c", capi["lib"],
                                  capi["base"] / ("threads_asan" if sanitize else "threads"), *flags)
    except subprocess.CalledProcessError:
        pytest.skip("gcc cannot build with -fsanitize=address here")
    guild, channel, user = new_ids()
    creds = voice_server.create_session(guild, channel, user)
    proc = run(program, voice_server.url, creds.token, str(user), str(guild), str(channel), creds.session_id,
               env={"ASAN_OPTIONS": "detect_leaks=0"} if sanitize else None)
    assert "AddressSanitizer" not in proc.stderr, proc.stderr[-4000:]
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert lines(proc.stdout, "track_start ") == ["200"] and lines(proc.stdout, "track_end ") == ["200"]
    assert proc.stdout.rstrip().endswith("ok")
    assert voice_server.violations(user) == []


def test_c_program_on_a_dave_channel_is_heard_by_a_dave_peer(capi):
    """On a DAVE channel the C client (with its channel id: DAVE's group id) joins the MLS group with a
    davey peer already there; the peer decrypts its frames and hears both tones. Without the channel id
    the failure surfaces in C as TELECOM_E_INVALID naming it."""
    pytest.importorskip("davey", reason="davey (the DAVE peer's library) is not installed")
    import asyncio
    import threading

    from dave_peer import DavePeer

    server = LocalVoiceServer(dave=True, heartbeat_interval=1.0, session_timeout=10.0)
    server.start_background()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def on_loop(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(20)

    peer = None
    try:
        guild, channel, user = new_ids()
        peer = DavePeer.for_credentials(server.create_session(guild, channel, user + 100), server.url)
        on_loop(peer.join())
        creds = server.create_session(guild, channel, user)
        proc = run(capi["play"], *play_args(server, creds))
        assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
        ready = [e for e in lines(proc.stdout, "event ") if e.startswith("ready ")]
        assert ready and '"dave_protocol_version":1' in ready[0]
        packets = server.record(user).audio_packets()
        dave_frames = sum(p.payload.endswith(b"\xfa\xfa") for p in packets)
        assert dave_frames >= 0.9 * len(packets) > 150  # the SFU saw (almost) only DAVE frames
        import opuslib

        decoder = opuslib.Decoder(48000, 2)
        frames = [p for p in peer.audio_from(user) if p is not None]
        pcm = b"".join(bytes(3840) if f == b"\xf8\xff\xfe" else decoder.decode(f, 5760) for f in frames)
        windows = tone_windows(pcm)
        assert sum(abs(w[1] - 440) < 3 for w in windows) >= 12, windows
        assert sum(abs(w[1] - 660) < 3 for w in windows) >= 10, windows

        other = user + 200
        creds = server.create_session(guild, channel, other)
        proc = run(capi["seed"], server.url, creds.token, str(other), str(guild), creds.session_id)
        assert proc.returncode == 4
        assert "not ready: TELECOM_E_INVALID" in proc.stdout and "channel id" in proc.stdout
    finally:
        if peer is not None:
            on_loop(peer.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        server.stop_background()


def test_telecom_venv_overrides_the_baked_in_environment(capi, voice_server, tmp_path):
    """The library looks for telecom in the venv baked in at build time unless TELECOM_VENV says otherwise;
    a wrong one fails every call with TELECOM_E_INIT and says where it looked."""
    missing = tmp_path / "no-such-venv"
    proc = run(capi["play"], "x", "x", "", "1", "2", "3", "s", env={"TELECOM_VENV": str(missing)})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "init failed: TELECOM_E_INIT" in proc.stdout and str(missing) in proc.stdout
    assert "TELECOM_VENV" in proc.stdout

    # A library whose baked-in venv is wrong works when TELECOM_VENV names the right one.
    lib = build_library(tmp_path / "lib", "--venv", str(missing))
    program = compile_program("seed.c", lib, tmp_path / "seed")
    guild, channel, user = new_ids()
    creds = voice_server.create_session(guild, channel, user)
    args = [voice_server.url, creds.token, str(user), str(guild), creds.session_id]
    env = {k: v for k, v in os.environ.items() if k != "TELECOM_VENV"}
    broken = subprocess.run([str(program), *args], capture_output=True, text=True, timeout=60, env=env)
    assert broken.returncode == 4 and "not ready: TELECOM_E_INIT" in broken.stdout
    assert str(missing) in broken.stdout and "the build-time venv" in broken.stdout
    creds = voice_server.create_session(guild, channel, user)
    fixed = run(program, voice_server.url, creds.token, str(user), str(guild), creds.session_id,
                env={"TELECOM_VENV": sys.prefix})
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "pipe_send TELECOM_OK" in fixed.stdout


def test_header_compiles_as_cpp_and_without_short_names(capi, tmp_path):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    source = tmp_path / "h.cpp"
    source.write_text('#define TELECOM_NO_SHORT_NAMES\n#include "telecom.h"\nint client = 1;\n'
                      "int main() { telecom_event e; return sizeof(e.name) == 32 && client ? 0 : 1; }\n")
    subprocess.run(["g++", "-Wall", "-Werror", f"-I{capi['lib']}", "-o", str(tmp_path / "h"), str(source)],
                   check=True)
    assert subprocess.run([str(tmp_path / "h")]).returncode == 0


def _opus_packets(pcm: bytes) -> list[bytes]:
    """20 ms Opus packets made by opuslib (not telecom's encoder)."""
    import opuslib

    encoder = opuslib.Encoder(48000, 2, opuslib.APPLICATION_AUDIO)
    return [encoder.encode(pcm[i:i + 3840], 960) for i in range(0, len(pcm) - 3839, 3840)]


def _read_wav(path: Path) -> bytes:
    """48 kHz s16le stereo PCM of a WAV file (read with the soundfile package, not telecom)."""
    import soundfile

    data, rate = soundfile.read(str(path), dtype="int16", always_2d=True)
    assert rate == 48000, rate
    if data.shape[1] == 1:
        data = np.repeat(data, 2, axis=1)
    return data.astype("<i2").tobytes()


def _write_wav(path: Path, pcm: bytes) -> None:
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(pcm)


@pytest.mark.parametrize("mode,expected", [("", "SIGPIPE ignored"), ("handler", "SIGPIPE host handler")])
def test_the_embedded_runtime_ignores_sigpipe_unless_the_host_handles_it(capi, mode, expected):
    # A voice server that closes the websocket (4004, a crash) would otherwise kill the C host with
    # SIGPIPE on telecom's next write: seen as exit status -13 of a C program given a wrong token.
    program = compile_program("sigpipe.c", capi["lib"], capi["base"] / "sigpipe")
    proc = run(program, *([mode] if mode else []))
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout.splitlines() == [expected, "alive"]
