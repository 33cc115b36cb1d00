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
