"""The telecom command line, run as a user would (a subprocess) against the local voice server: what
``play`` sends is decoded by the server's own decoder, what ``record`` writes is read back with soundfile."""

from __future__ import annotations

import subprocess
import sys
import threading
import wave
from pathlib import Path

import numpy as np
import pytest

from audio_checks import stereo_tone
from conftest import new_ids
from telecom import Client, Playable
from test_capi import tone_windows

HAS_SOURCES = hasattr(Playable, "from_file")
try:
    import telecom.output  # noqa: F401
    HAS_RECEIVE = True
except ImportError:
    HAS_RECEIVE = False


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "telecom.cli", *args], capture_output=True, timeout=120,
                          **kwargs)


def connection_args(server, creds) -> list[str]:
    return ["--endpoint", server.url, "--token", creds.token, "--user", str(creds.user_id),
            "--guild", str(creds.guild_id), "--session", creds.session_id, "--channel", str(creds.channel_id)]


def audio_frames(server, user, count: int) -> None:
    """Until the server has ``count`` audio (non-silence) packets of ``user``: the CLI exits as soon as
    it has played out, so its last packets may still be in flight on loopback."""
    server.wait_for_sync(lambda: sum(not p.is_silence for p in server.record(user).packets) >= count, 5)


def test_play_pcm_from_stdin_at_half_volume(voice_server):
    guild, channel, user = new_ids()
    creds = voice_server.create_session(guild, channel, user)
    proc = run_cli("play", *connection_args(voice_server, creds), "--volume", "50", "-",
                   input=stereo_tone(1.5, 660.0))
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"joined: ssrc" in proc.stderr and b"played: 75 frames, 0 underruns" in proc.stderr
    audio_frames(voice_server, user, 75)
    windows = [w for w in tone_windows(voice_server.record(user).pcm()) if abs(w[1] - 660) < 3]
    assert len(windows) >= 12
    # -6 dBFS peak sine = -9 dB RMS, at 50 % volume another -6.02 dB.
    assert float(np.median([w[2] for w in windows])) == pytest.approx(-9.03 - 6.02, abs=1.0)
    assert voice_server.violations(user) == []


def test_play_a_file(voice_server, tmp_path):
    guild, channel, user = new_ids()
    creds = voice_server.create_session(guild, channel, user)
    path = tmp_path / "tone.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(stereo_tone(1.0, 880.0))
    proc = run_cli("play", *connection_args(voice_server, creds), str(path))
    if not HAS_SOURCES:
        assert proc.returncode == 1 and b"cannot play files or URLs" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr.decode()
    audio_frames(voice_server, user, 50)
    windows = [w for w in tone_windows(voice_server.record(user).pcm()) if abs(w[1] - 880) < 3]
    assert len(windows) >= 7


def test_play_reports_a_refused_connection(voice_server, tmp_path):
    guild, channel, user = new_ids()
    creds = voice_server.create_session(guild, channel, user)
    args = connection_args(voice_server, creds)
    args[args.index("--token") + 1] = "wrong-token"
    proc = run_cli("play", *args, "--timeout", "5", "-", input=b"")
    assert proc.returncode == 1
    assert proc.stderr.decode().startswith("telecom play: error:") and "4004" in proc.stderr.decode()


def test_play_rejects_a_bad_endpoint_at_once(voice_server):
    guild, channel, user = new_ids()
    creds = voice_server.create_session(guild, channel, user)
    args = connection_args(voice_server, creds)
    args[args.index("--endpoint") + 1] = "ftp://nowhere"
    proc = run_cli("play", *args, "-", input=b"")
    assert proc.returncode == 1 and b"telecom play: error:" in proc.stderr


@pytest.mark.skipif(not HAS_RECEIVE, reason="this build of telecom has no receive path (telecom.output)")
@pytest.mark.parametrize("who", ["--user-id", "--all"])
def test_record_writes_what_another_user_says(voice_server, tmp_path, who):
    guild, channel, user = new_ids()
    speaker_id = user + 100
    creds = voice_server.create_session(guild, channel, user)
    speaker_creds = voice_server.create_session(guild, channel, speaker_id)
    speaker = Client(speaker_id, guild, speaker_creds.session_id, channel_id=channel)
    speaker.set_server_info(voice_server.url, speaker_creds.token)
    speaker.wait_ready(10)
    out = tmp_path / "heard.wav"
    selector = ["--user-id", str(speaker_id)] if who == "--user-id" else ["--all"]
    proc = subprocess.Popen([sys.executable, "-m", "telecom.cli", "record",
                             *connection_args(voice_server, creds), *selector, "--out", str(out),
                             "--seconds", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    started = threading.Event()
    stderr_lines: list[bytes] = []

    def read_stderr():
        for line in proc.stderr:
            stderr_lines.append(line)
            if line.startswith(b"recording"):
                started.set()
    reader = threading.Thread(target=read_stderr)
    reader.start()
    try:
        assert started.wait(20), b"".join(stderr_lines).decode()
        pipe = Playable.from_pcm_pipe()
        pipe.send(stereo_tone(1.5, 523.0))
        pipe.close()
        speaker.play(pipe)
        pipe.done.result(5)
        assert proc.wait(30) == 0, b"".join(stderr_lines).decode()
    finally:
        reader.join(5)
        speaker.close()
    assert any(line.startswith(b"wrote ") for line in stderr_lines)
    import soundfile

    data, rate = soundfile.read(str(out), dtype="int16", always_2d=True)
    assert rate == 48000
    pcm = (np.repeat(data, 2, axis=1) if data.shape[1] == 1 else data).astype("<i2").tobytes()
    windows = [w for w in tone_windows(pcm) if abs(w[1] - 523) < 3]
    assert len(windows) >= 10, tone_windows(pcm)
    assert float(np.median([w[2] for w in windows])) == pytest.approx(-9.03, abs=1.5)


def test_demo_runs_and_reports_ok(tmp_path):
    proc = run_cli("demo", "--out", str(tmp_path / "recordings"))
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()
    assert "demo OK" in out and "no violations" in out and "DAVE frames" in out
    # B's recordings: A alone (3 tones of 1 s) and the muxed channel; 48 kHz s16 stereo WAV
    assert (tmp_path / "recordings" / "alice.wav").stat().st_size > 3 * 192000
    assert (tmp_path / "recordings" / "everyone.wav").stat().st_size > 3 * 192000


def test_capi_build_writes_the_library_and_header(tmp_path):
    proc = run_cli("capi-build", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr.decode()
    assert (tmp_path / "libtelecom.so").stat().st_size > 10000
    header = Path(telecom_pkg_dir()) / "capi" / "telecom.h"
    assert (tmp_path / "telecom.h").read_text() == header.read_text()


def telecom_pkg_dir() -> str:
    import telecom as pkg

    return str(Path(pkg.__file__).parent)
