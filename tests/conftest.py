"""Shared fixtures: the local voice server on loopback, and a guard that fails any test during which an
exception reached telecom's io loop or a media thread died."""

from __future__ import annotations

import itertools
import threading

import pytest

_ids = itertools.count(1000)


def new_ids() -> tuple[int, int, int]:
    """A fresh (guild_id, channel_id, user_id) triple."""
    base = next(_ids) * 10
    return base + 1, base + 2, base + 3


def join_watcher(server, guild: int, channel: int, user: int):
    """A client ``user`` in the channel that notes who leaves: (client, [user ids], wait_left(uid, s))."""
    import time

    from telecom import Client

    creds = server.create_session(guild, channel, user)
    client = Client(user, guild, creds.session_id, channel_id=channel)
    client.set_server_info(server.url, creds.token)
    client.wait_ready(10)
    left: list[int] = []
    client.on("user_leave", lambda event: left.append(event.data.get("user_id")))

    def wait_left(uid: int, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while uid not in left and time.monotonic() < deadline:
            time.sleep(0.02)
        return uid in left

    return client, left, wait_left


@pytest.fixture(scope="module")
def voice_server():
    """A DAVE-off local voice server in a background thread (module scope: tests use fresh ids)."""
    from telecom.testing import LocalVoiceServer

    server = LocalVoiceServer(dave=False, heartbeat_interval=1.0, session_timeout=10.0)
    server.start_background()
    yield server
    server.stop_background()


@pytest.fixture(autouse=True)
def no_background_failures():
    import telecom.engine as engine_mod

    before = len(engine_mod._engine.loop_errors) if engine_mod._engine else 0
    yield
    engine = engine_mod._engine
    if engine is None:
        return
    errors = engine.loop_errors[before:]
    assert not errors, f"exceptions reached telecom's io loop: {[e.get('message') for e in errors]}"
    alive = {t.name for t in threading.enumerate()}
    missing = [f"telecom-media-{i}" for i in range(engine.media.threads) if f"telecom-media-{i}" not in alive]
    assert not missing, f"media threads died: {missing}"
    assert "telecom-io" in alive, "telecom's io thread died"
