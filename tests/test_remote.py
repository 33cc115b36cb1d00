"""RemoteClient and NodePool against two telecom-server nodes (subprocesses) and the local voice server:
the tone a RemoteClient plays is decoded at the voice server, a node-side recording decodes, the pool
spreads connections by load, and killing a node moves its connections (audio resumes; the time is
measured and printed, never asserted)."""

from __future__ import annotations

import io
import os
import tempfile
import time

import numpy as np
import pytest

from audio_checks import active_part, left_channel, peak_frequency, rms_db, stereo_tone
from conftest import new_ids
from media import MediaServer, tone_file
from telecom.remote import Node, NodePool, RemoteClient, RemoteOutput, RemotePlayable
from test_server import NodeProcess


@pytest.fixture(scope="module")
def env():
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "a"))
        os.makedirs(os.path.join(tmp, "b"))
        files = {"tone.ogg": open(tone_file(tmp, "opus", 2.0, 440.0), "rb").read(),
                 "long.wav": open(tone_file(tmp, "wav", 30.0, 330.0), "rb").read()}
        nodes = [NodeProcess(os.path.join(tmp, "a"), "--allow", "127.0.0.1/32"),
                 NodeProcess(os.path.join(tmp, "b"), "--allow", "127.0.0.1/32")]
        with MediaServer(files) as media:
            try:
                yield nodes, media
            finally:
                for n in nodes:
                    n.stop()


def pool_clients(pool, voice_server, n: int) -> list[tuple[RemoteClient, int]]:
    """``n`` connections placed by ``pool``, each in its own guild and connecting: [(client, user id)]."""
    out = []
    for _ in range(n):
        guild, channel, user = new_ids()
        creds = voice_server.create_session(guild, channel, user)
        client = pool.client(user, guild, creds.session_id, channel_id=channel)
        client.set_server_info(voice_server.url, creds.token)
        out.append((client, user))
    return out


def join(client, voice_server, guild, channel, user):
    creds = voice_server.create_session(guild, channel, user)
    client.session_id = creds.session_id
    client.set_server_info(voice_server.url, creds.token)
    return creds


def test_remote_client_plays_a_url_heard_at_the_voice_server(env, voice_server):
    (a, _b), media = env
    node = Node(a.url, a.password).start()
    guild, channel, user = new_ids()
    creds = voice_server.create_session(guild, channel, user)
    client = RemoteClient(user, guild, creds.session_id, channel_id=channel, node=node)
    seen = []
    client.on("*", lambda ev: seen.append(ev.name))
    client.set_server_info(voice_server.url, creds.token)
    client.wait_ready(10)
    track = client.play(RemotePlayable.from_url(media.url("/f/tone.ogg")))
    assert track.id is not None and track.state == "playing"
    assert track.done.result(10) == "ended" and track.end_reason == "finished"
    voice_server.wait_for_sync(lambda: voice_server.record(user).speaking_events[-1][1] == 0, 5)
    audio = active_part(left_channel(voice_server.record(user).pcm()))
    assert peak_frequency(audio) == pytest.approx(440.0, abs=2.0)
    assert rms_db(audio) == pytest.approx(-9.03, abs=1.0)
    stats = client.stats()
    assert stats["stats"]["frames_sent"] >= 95 and stats["node"] == a.url
    assert {"ready", "track_start", "track_end"} <= set(seen)
    client.close()
    node.close()


def ready_client(env, voice_server):
    """A RemoteClient on the first node, joined and ready: (node, client, user id)."""
    (a, _), _ = env
    node = Node(a.url, a.password).start()
    guild, channel, user = new_ids()
    client = RemoteClient(user, guild, "x", channel_id=channel, node=node)
    join(client, voice_server, guild, channel, user)
    client.wait_ready(10)
    return node, client, user


def push_all(send, chunks) -> int:
    """Send every chunk in order, waiting while the node's buffer is full; returns how often it was."""
    from telecom import BufferFull

    full = 0
    for chunk in chunks:
        while True:
            try:
                send(chunk)
                break
            except BufferFull:
                full += 1
                time.sleep(0.05)
    return full


def test_remote_opus_pipe_packets_reach_the_voice_server_as_sent(env, voice_server):
    """RemotePlayable.from_opus_pipe(): opuslib's packets pushed to the node in batches (BufferFull when
    the node's queue is full; CodecError and nothing queued for a bad batch), closed: the voice server
    receives the same packets, in order."""
    from telecom import CodecError
    from test_server import opuslib_packets

    node, client, user = ready_client(env, voice_server)
    pipe = client.play(RemotePlayable.from_opus_pipe(buffer_seconds=0.4))
    packets = opuslib_packets(stereo_tone(1.2, 587.0))
    with pytest.raises(CodecError):
        pipe.send_many(packets[:2] + [b""])            # refused before it leaves the client
    with pytest.raises(CodecError):
        pipe.send_many(packets[:2] + [b"\xff" * 3])   # refused by the node: not a 20 ms packet
    assert push_all(pipe.send_many, [packets[i:i + 8] for i in range(0, len(packets), 8)]) > 0
    pipe.close()
    assert pipe.done.result(10) == "ended"
    time.sleep(0.3)
    assert [p.payload for p in voice_server.record(user).audio_packets()] == packets
    client.close()
    node.close()


def test_remote_pcm_pipe_is_heard_at_the_voice_server(env, voice_server):
    """RemotePlayable.from_pcm_pipe(): PCM pushed to the node in pieces (BufferFull when the node's
    buffer is full, as with a local PcmPipe), closed, heard and decoded at the voice server."""
    node, client, user = ready_client(env, voice_server)
    pipe = client.play(RemotePlayable.from_pcm_pipe(buffer_seconds=0.5))
    pcm = stereo_tone(1.2, 587.0)
    assert push_all(pipe.send, [pcm[i:i + pipe.MAX_SEND] for i in range(0, len(pcm), pipe.MAX_SEND)]) > 0
    pipe.close()
    assert pipe.done.result(10) == "ended"
    time.sleep(0.3)
    audio = active_part(left_channel(voice_server.record(user).pcm()))
    assert len(audio) >= 1.2 * 48000 - 2 * 4800 - 960
    assert peak_frequency(audio) == pytest.approx(587.0, abs=2.0)
    assert rms_db(audio) == pytest.approx(-9.03, abs=1.0)
    client.close()
    node.close()


def test_remote_recording_decodes(env, voice_server):
    import soundfile

    from telecom import Client, Playable

    (a, _b), _media = env
    node = Node(a.url, a.password).start()
    guild, channel, user = new_ids()
    speaker = user + 5
    creds = voice_server.create_session(guild, channel, user)
    client = RemoteClient(user, guild, creds.session_id, channel_id=channel, node=node)
    client.set_server_info(voice_server.url, creds.token)
    client.wait_ready(10)
    out = client.get_user(speaker).set_output(RemoteOutput.to_file("flac"))
    talker_creds = voice_server.create_session(guild, channel, speaker)
    talker = Client(speaker, guild, talker_creds.session_id, channel_id=channel)
    talker.set_server_info(voice_server.url, talker_creds.token)
    talker.wait_ready(10)
    pipe = Playable.from_pcm_pipe()
    pipe.send(stereo_tone(2.0, 740.0))
    pipe.close()
    talker.play(pipe)
    pipe.done.result(6)
    time.sleep(0.5)
    client.get_user(speaker).set_output(None)
    samples, rate = soundfile.read(io.BytesIO(client.download(out.file)), dtype="int16")
    audio = active_part(samples[:, 0].astype(np.float64))
    assert rate == 48000 and len(audio) > 48000
    assert peak_frequency(audio) == pytest.approx(740.0, abs=2.0)
    talker.close()
    client.close()
    node.close()


def test_pool_spreads_by_load_and_moves_connections_off_a_dead_node(env, voice_server, tmp_path):
    (a, b), media = env
    # Node a already carries 4 playing connections the pool did not place: the pool must see that load.
    preload = Node(a.url, a.password).start()
    busy = []
    for _ in range(4):
        guild, channel, user = new_ids()
        creds = voice_server.create_session(guild, channel, user)
        c = RemoteClient(user, guild, creds.session_id, channel_id=channel, node=preload)
        c.set_server_info(voice_server.url, creds.token)
        busy.append(c)
    for c in busy:
        c.wait_ready(10)
        c.play(RemotePlayable.from_url(media.url("/f/long.wav"), volume=10))
    time.sleep(1.2)   # two stats intervals: the pool's nodes hear about it
    pool = NodePool([(a.url, a.password), (b.url, b.password)]).start()
    time.sleep(1.2)
    events = []
    pool.on("*", lambda ev: events.append(ev))
    clients = pool_clients(pool, voice_server, 20)
    for c, _ in clients:
        c.wait_ready(15)
    placed = pool.placement()
    print(f"\npool placement of 20 connections (node a preloaded with 4 playing): {placed}")
    assert placed[a.url] + placed[b.url] == 20
    assert placed[b.url] > placed[a.url] >= 1      # spread over both, fewer on the loaded node
    # play on the connections of node b, then kill b
    on_b = [(c, u) for c, u in clients if c.node.url == b.url][:6]
    for c, _ in on_b:
        c.play(RemotePlayable.from_url(media.url("/f/long.wav")))
    time.sleep(1.5)
    killed_at = time.monotonic()
    b.kill()
    deadline = time.monotonic() + 20
    moved = {}
    while time.monotonic() < deadline and len(moved) < placed[b.url]:
        for ev in list(events):
            if ev.name == "connection_moved":
                moved[ev.guild_id] = ev
        time.sleep(0.05)
    assert [ev.name for ev in events if ev.name == "node_down"] == ["node_down"]
    assert len(moved) == placed[b.url] and all(ev.to_node == a.url for ev in moved.values())
    # audio of each playing connection resumes at the voice server: first packet after the kill
    resumed = []
    for c, user in on_b:
        def heard_again(user=user):
            packets = [p for p in voice_server.record(user).packets if p.arrival > killed_at + 0.2]
            return len(packets) >= 50 and packets
        packets = voice_server.wait_for_sync(heard_again, 15)
        resumed.append(packets[0].arrival - killed_at)
        assert c.node.url == a.url and c.moves == 1
        assert c.playables and c.playables[0].state == "playing"
    # what came after the move is the same tone, picked up near where it was (position replayed)
    c, user = on_b[0]
    after = [p for p in voice_server.record(user).packets if p.arrival > killed_at + 0.2]
    assert c.playables[0].position > 2.5
    print(f"audio resumed after the node kill in {min(resumed):.2f}..{max(resumed):.2f} s "
          f"(median {sorted(resumed)[len(resumed) // 2]:.2f} s) for {len(resumed)} playing connections; "
          f"moves reported after {min(ev.seconds for ev in moved.values()):.2f}.."
          f"{max(ev.seconds for ev in moved.values()):.2f} s")
    assert len(after) >= 50
    for c, user in on_b:   # the audio after the move: the same 330 Hz tone, decoded at the voice server
        tail = left_channel(voice_server.record(user).pcm())[-38400:]
        assert peak_frequency(tail) == pytest.approx(330.0, abs=2.0)
        assert rms_db(tail) == pytest.approx(-9.03, abs=1.5)
    pool.close()
    for c in busy:
        c.close()
    preload.close()


def test_pool_readmits_a_node_that_comes_back(voice_server, tmp_path):
    """A node that dies is probed and re-admitted when it answers again (node_up), and takes new
    connections; so is a node that was down when the pool started."""
    import socket

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    a = NodeProcess(str(tmp_path), "--allow", "127.0.0.1/32")
    b_port, c_port = free_port(), free_port()
    b = NodeProcess(str(tmp_path), "--allow", "127.0.0.1/32", port=b_port)
    c = None                                   # the third node is down at start
    pool = NodePool([(a.url, a.password), (b.url, b.password), (f"http://127.0.0.1:{c_port}", a.password)],
                    readmit_interval=0.2).start()
    events = []
    pool.on("*", lambda ev: events.append((ev.name, ev.node if hasattr(ev, "node") else None)))
    try:
        assert [n.url for n in pool.live_nodes()] == [a.url, b.url]
        b.kill()
        deadline = time.monotonic() + 15
        while ("node_down", b.url) not in events and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ("node_down", b.url) in events
        assert [n.url for n in pool.live_nodes()] == [a.url]
        b = NodeProcess(str(tmp_path), "--allow", "127.0.0.1/32", port=b_port)
        c = NodeProcess(str(tmp_path), "--allow", "127.0.0.1/32", port=c_port)
        deadline = time.monotonic() + 15
        while len(pool.live_nodes()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(n.url for n in pool.live_nodes()) == sorted([a.url, b.url, c.url])
        assert ("node_up", b.url) in events and ("node_up", c.url) in events
        # New connections go to the re-admitted nodes too, and work there.
        clients = [client for client, _ in pool_clients(pool, voice_server, 3)]
        for client in clients:
            client.wait_ready(15)
        assert sorted(cl.node.url for cl in clients) == sorted([a.url, b.url, c.url])
    finally:
        pool.close()
        for node in (a, b, c):
            if node is not None:
                node.stop()
