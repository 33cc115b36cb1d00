"""Clean shutdown: closing clients gives back every socket, fd and thread they took, including after
resumes and failed joins; the engine keeps serving the others."""

from __future__ import annotations

import gc
import os
import threading
import time

from audio_checks import stereo_tone
from conftest import new_ids
from telecom import Client, ConnectTimeout, GatewayError, Playable


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def settle(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gc.collect()
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_closing_clients_gives_back_fds_and_threads(voice_server):
    # Warm up: the engine (io + media threads) starts with the first client and stays for the process.
    guild, channel, user = new_ids()
    creds = voice_server.create_session(guild, channel, user)
    with Client(user, guild, creds.session_id, channel_id=channel) as warm:
        warm.set_server_info(voice_server.url, creds.token)
        warm.wait_ready(10)
    settle(lambda: False, 0.3)
    fds0, threads0 = open_fds(), threading.active_count()

    for round_ in range(3):
        clients = []
        for _ in range(5):
            guild, channel, user = new_ids()
            creds = voice_server.create_session(guild, channel, user)
            client = Client(user, guild, creds.session_id, channel_id=channel)
            client.set_server_info(voice_server.url, creds.token)
            clients.append((client, user))
        pipes = []
        for client, _ in clients:
            client.wait_ready(10)
            pipe = Playable.from_pcm_pipe()
            pipe.send(stereo_tone(0.3, 440.0))
            client.play(pipe)
            pipes.append(pipe)
        # One of them loses its websocket mid-track and resumes.
        voice_server.drop_client(clients[0][1])
        time.sleep(0.4)
        for client, _ in clients:
            client.close()
        for pipe in pipes:
            pipe.done.result(5)
        assert all(c.state == "closed" for c, _ in clients)
        del clients, pipes, client, pipe

    assert settle(lambda: open_fds() <= fds0), f"fds: {fds0} before, {open_fds()} after"
    assert settle(lambda: threading.active_count() <= threads0), \
        f"threads: {threads0} before, {threading.active_count()} after: {threading.enumerate()}"


def test_failed_joins_leave_nothing_behind(voice_server):
    settle(lambda: False, 0.2)
    fds0, threads0 = open_fds(), threading.active_count()
    for _ in range(5):
        guild, channel, user = new_ids()
        voice_server.create_session(guild, channel, user)
        client = Client(user, guild, "no-such-session", channel_id=channel)
        client.set_server_info(voice_server.url, "wrong-token")
        try:
            client.wait_ready(10)
        except (GatewayError, ConnectTimeout) as exc:
            assert getattr(exc, "code", None) == 4004
        else:
            raise AssertionError("a wrong token must not join")
        client.close()
    assert settle(lambda: open_fds() <= fds0), f"fds: {fds0} before, {open_fds()} after"
    assert settle(lambda: threading.active_count() <= threads0)


EXIT_SCRIPT = '''
import sys, time
sys.path.insert(0, sys.argv[2])
from audio_checks import stereo_tone
from telecom import Client, Output, Playable
from telecom.testing import LocalVoiceServer

server = LocalVoiceServer(dave=False)
server.start_background()
clients = []
for uid in (501, 502):
    creds = server.create_session(5, 6, uid)
    c = Client(uid, 5, creds.session_id, channel_id=6)
    c.set_server_info(server.url, creds.token)
    clients.append(c)
for c in clients:
    c.wait_ready(10)
clients[1].get_user(501).set_output(Output.to_file(sys.argv[1]))
pipe = Playable.from_pcm_pipe()
pipe.send(stereo_tone(3.0, 440.0))
clients[0].play(pipe)
time.sleep(1.5)
print("exiting mid-call", flush=True)
# no close(): the interpreter exits with the call running and the recording open
'''


def test_process_exit_mid_call_leaves_a_valid_recording(tmp_path):
    import subprocess
    import sys

    import numpy as np
    import soundfile as sf

    from audio_checks import peak_frequency

    script = tmp_path / "exit_mid_call.py"
    script.write_text(EXIT_SCRIPT)
    out = tmp_path / "bob.flac"
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, str(script), str(out), tests_dir], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    data, rate = sf.read(str(out), dtype="int16")  # a FLAC left unfinalised does not even open
    assert rate == 48000 and data.ndim == 2
    assert 0.8 < len(data) / rate < 2.5
    left = data[:, 0].astype(np.float64)
    loud = np.flatnonzero(np.abs(left) > 2000)
    assert len(loud) > 24000
    assert abs(peak_frequency(left[loud[0]:loud[-1]]) - 440.0) < 2.0
