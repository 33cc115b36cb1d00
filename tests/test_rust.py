"""The Rust binding (bindings/rust): its unit tests and its example, built with cargo against a freshly
built libtelecom.so and run against the local voice server; what the server decoded is checked."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from audio_checks import stereo_tone
from conftest import new_ids
from telecom import Playable
from test_capi import build_library, tone_windows

CRATE = Path(__file__).resolve().parent.parent / "bindings" / "rust"

pytestmark = pytest.mark.skipif(shutil.which("cargo") is None,
                                reason="cargo is not installed: the Rust binding cannot be built here")


@pytest.fixture(scope="module")
def rust_env(tmp_path_factory):
    base = tmp_path_factory.mktemp("rust")
    lib = build_library(base / "lib")
    # The target directory outside the source tree: other checkouts/builds cannot interfere.
    return dict(os.environ, TELECOM_LIB_DIR=str(lib), CARGO_TARGET_DIR=str(base / "target"),
                CARGO_NET_OFFLINE="true")


def cargo(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["cargo", *args, "--offline"], cwd=CRATE, env=env, capture_output=True, text=True,
                          timeout=600)


def test_crate_unit_tests_pass_against_the_library(rust_env):
    proc = cargo(rust_env, "test")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test result: ok. 6 passed" in proc.stdout


def test_build_script_names_the_missing_library(rust_env, tmp_path):
    env = dict(rust_env, TELECOM_LIB_DIR=str(tmp_path), CARGO_TARGET_DIR=str(tmp_path / "target"))
    proc = cargo(env, "build")
    assert proc.returncode != 0
    assert "libtelecom.so does not exist" in proc.stderr and "telecom.capi.build" in proc.stderr


def test_rust_example_plays_tones_and_a_file(rust_env, voice_server, tmp_path):
    proc = cargo(rust_env, "build", "--example", "play")
    assert proc.returncode == 0, proc.stderr
    program = Path(rust_env["CARGO_TARGET_DIR"]) / "debug" / "examples" / "play"
    media = tmp_path / "tone880.wav"
    import wave

    with wave.open(str(media), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(stereo_tone(1.0, 880.0))

    guild, channel, user = new_ids()
    creds = voice_server.create_session(guild, channel, user)
    run = subprocess.run([str(program), voice_server.url, creds.token, "", str(user), str(guild),
                          str(channel), creds.session_id, str(media)],
                         capture_output=True, text=True, timeout=90,
                         env={k: v for k, v in rust_env.items() if k != "TELECOM_VENV"})
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert out.splitlines()[0] == "telecom 0.1.0" and out.rstrip().endswith("done")
    assert "error TELECOM_E_INVALID client_set_volume: volume must be 0..200" in out
    assert "event ready " in out and out.count("event track_end ") >= 2

    windows = tone_windows(voice_server.record(user).pcm())
    tone = [w for w in windows if abs(w[1] - 440) < 3]
    loud = [w[2] for w in tone if w[2] > -12]
    quiet = [w[2] for w in tone if w[2] <= -12]
    assert len(loud) >= 12 and len(quiet) >= 7, windows
    assert float(np.median(loud)) == pytest.approx(-9.01, abs=1.0)
    assert float(np.median(quiet)) - float(np.median(loud)) == pytest.approx(-6.02, abs=0.5)
    flags = [f & 1 for _, f in voice_server.record(user).speaking_events]
    assert flags[:3] == [1, 0, 1]  # the pause
    if hasattr(Playable, "from_url"):
        assert "file played" in out
        assert sum(1 for w in windows if abs(w[1] - 880) < 3) >= 7
    else:
        assert "file unsupported: TELECOM_E_UNSUPPORTED" in out
    assert voice_server.violations(user) == []
