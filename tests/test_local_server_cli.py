"""``telecom emulate``: run as a subprocess, read what it prints, and use it to connect."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time

from voiceclient_script import AES, ScriptedVoiceClient, tone_frames


def _start(*args: str) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "telecom.cli", "emulate", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: list[str] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith("{"):  # the --json line comes last
            return proc, lines
    proc.kill()
    raise AssertionError(f"emulate printed no details: {lines} {proc.stderr.read()}")


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    return out


def test_emulate_prints_connection_details_that_work():
    proc, lines = _start("--no-dave", "--guild", "11", "--channel", "22", "--user", "33", "--user", "44",
                         "--json")
    try:
        text = "\n".join(lines)
        info = json.loads(lines[-1])
        port = int(re.search(r"endpoint: 127\.0\.0\.1:(\d+)", text).group(1))
        assert info["endpoint"] == f"127.0.0.1:{port}" and info["url"] == f"ws://127.0.0.1:{port}/"
        assert [s["user_id"] for s in info["sessions"]] == [33, 44]
        for s in info["sessions"]:
            line = f"user {s['user_id']}: guild=11 channel=22 session_id={s['session_id']} token={s['token']}"
            assert line in text
        # The Python snippet names the first user's credentials.
        first = info["sessions"][0]
        assert f"Client(33, 11, {first['session_id']!r}, channel_id=22)" in text
        assert f"set_server_info('ws://127.0.0.1:{port}/', {first['token']!r})" in text

        async def use_printed_credentials():
            creds = type("Creds", (), {"guild_id": 11, "channel_id": 22, "user_id": 33,
                                       "session_id": first["session_id"], "token": first["token"]})
            alice = ScriptedVoiceClient.for_credentials(creds, info["url"])
            desc = await alice.handshake(AES, max_dave=0)
            await alice.speaking(1)
            frames, _ = tone_frames(440, 0.2)
            await alice.send_stream(frames)
            await asyncio.sleep(0.2)
            await alice.close()
            return desc

        desc = asyncio.run(asyncio.wait_for(use_printed_credentials(), 20))
        assert desc["dave_protocol_version"] == 0
    finally:
        out = _stop(proc) if proc.poll() is None else ""
    # On Ctrl-C it reports what it received.
    assert "user 33: 15 RTP packets (5 silence), 0 violations" in out


def test_emulate_tls_prints_a_working_ca_file():
    proc, lines = _start("--tls", "--json")
    try:
        info = json.loads(lines[-1])
        text = "\n".join(lines)
        assert info["url"].startswith("wss://") and info["dave"] is True
        assert f"CA file: {info['ca_file']}" in text and os.path.exists(info["ca_file"])
        assert f"ssl={info['ca_file']!r}" in text
        session = info["sessions"][0]

        async def handshake():
            creds = type("Creds", (), {"guild_id": session["guild_id"], "channel_id": session["channel_id"],
                                       "user_id": session["user_id"], "session_id": session["session_id"],
                                       "token": session["token"]})
            alice = ScriptedVoiceClient.for_credentials(
                creds, info["url"], ssl=ssl.create_default_context(cafile=info["ca_file"]))
            desc = await alice.handshake(AES, max_dave=1)
            await alice.close()
            return desc

        assert asyncio.run(asyncio.wait_for(handshake(), 20))["dave_protocol_version"] == 1
    finally:
        _stop(proc)
