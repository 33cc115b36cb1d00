"""telecom's DAVE client (telecom.dave + Client) in a call with independent davey-driven peers, at the local
voice server acting as MLS external sender. Audio is judged by a peer that decrypts with its own davey
session and decodes with opuslib; the server's record shows what the SFU could see."""

from __future__ import annotations

import asyncio
import threading
import time

import davey
import numpy as np
import pytest

from audio_checks import active_part, left_channel, peak_frequency, stereo_tone, tone_share
from conftest import new_ids
from dave_peer import DavePeer
from telecom import Client, GatewayError, Output, Playable
from telecom.dave import DECRYPT_FAILURE_TOLERANCE, DaveSessionManager
from telecom.gateway import GatewayConfig
from telecom.testing import LocalVoiceServer, mls
from voiceclient_script import decode_opus, tone_frames

FA_FA = b"\xfa\xfa"


@pytest.fixture(scope="module")
def dave_server():
    server = LocalVoiceServer(dave=True, heartbeat_interval=1.0, session_timeout=10.0,
                              dave_transition_timeout=1.0)
    server.start_background()
    yield server
    server.stop_background()


@pytest.fixture(scope="module")
def peer_loop():
    """An asyncio loop in a thread for the davey peers (telecom has its own io thread)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="dave-peers", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


class Call:
    """One channel: telecom clients and davey peers, with helpers that block the test thread."""

    def __init__(self, server: LocalVoiceServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server, self.loop = server, loop
        self.guild, self.channel, _ = new_ids()
        self.clients: dict[int, Client] = {}
        self.peers: dict[int, DavePeer] = {}
        self.events: dict[int, list[dict]] = {}

    def run(self, coro, timeout: float = 20.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def user(self) -> int:
        return new_ids()[2]

    def add_peer(self, user: int | None = None) -> DavePeer:
        user = user or self.user()
        creds = self.server.create_session(self.guild, self.channel, user)
        peer = DavePeer.for_credentials(creds, self.server.url)
        self.run(peer.join())
        self.peers[user] = peer
        return peer

    def add_client(self, user: int | None = None, **kwargs) -> Client:
        user = user or self.user()
        creds = self.server.create_session(self.guild, self.channel, user)
        client = Client(user, self.guild, creds.session_id, channel_id=self.channel, **kwargs)
        self.events[user] = events = []
        client.on("dave", lambda e: events.append(dict(e.data)))
        client.set_server_info(self.server.url, creds.token)
        client.wait_ready(10)
        self.clients[user] = client
        return client

    def remove(self, user: int) -> None:
        if user in self.clients:
            self.clients.pop(user).close()
        else:
            self.run(self.peers.pop(user).close())

    def settled(self, timeout: float = 15.0) -> tuple[int, str]:
        """Until server, clients and peers agree on one epoch and one privacy code."""
        def check():
            for peer in self.peers.values():
                assert not peer.errors, peer.errors
            snap = self.server.dave_hooks.snapshot(self.channel)
            members = set(self.clients) | set(self.peers)
            if snap["transition"] is not None or set(snap["leaves"]) != members or snap["epoch"] == 0:
                return None
            states = {(c.stats()["epoch"], c.voice_privacy_code) for c in self.clients.values()}
            states |= {(p.dave.epoch, p.dave.voice_privacy_code) for p in self.peers.values()}
            if len(states) == 1:
                (state,) = states
                if state == (snap["epoch"], state[1]) and state[1]:
                    return state
            return None
        return self.server.wait_for_sync(check, timeout)

    def play(self, user: int, seconds: float, freq: float) -> Playable:
        pipe = Playable.from_pcm_pipe()
        pipe.send(stereo_tone(seconds, freq))
        pipe.close()
        self.clients[user].play(pipe)
        return pipe

    def close(self) -> None:
        for user in list(self.clients) + list(self.peers):
            self.remove(user)


@pytest.fixture
def call(dave_server, peer_loop):
    c = Call(dave_server, peer_loop)
    yield c
    c.close()


def heard(peer: DavePeer, user: int, start: int = 0) -> np.ndarray:
    """What ``peer`` decrypted from ``user`` (frames from index ``start``), decoded with opuslib."""
    frames = [p for p in peer.audio_from(user)[start:] if p is not None]
    return left_channel(decode_opus(frames)) if frames else np.zeros(0)


def assert_tone(x: np.ndarray, freq: float, min_seconds: float = 0.8) -> None:
    body = active_part(x)
    assert len(body) >= min_seconds * 48000, f"only {len(body) / 48000:.2f} s of audio"
    assert abs(peak_frequency(body) - freq) < 2.0


def server_view(server: LocalVoiceServer, user: int, start: int = 0) -> tuple[int, int, np.ndarray]:
    """(audio packets, DAVE frames among them, the record decoded by opuslib as if it were plain)."""
    record = server.record(user)
    packets = record.audio_packets()[start:]
    return len(packets), sum(p.payload.endswith(FA_FA) for p in packets), left_channel(record.pcm())


def test_three_clients_join_one_after_another_and_a_davey_peer_hears_each(call):
    peer = call.add_peer()
    users = []
    for n in range(3):
        users.append(call.add_client().user_id)
        epoch, code = call.settled()
        assert epoch == n + 1 and len(code) == 30 and code.isdigit()
    for client in call.clients.values():
        stats = client.stats()
        assert stats["dave_status"] == "active" and stats["epoch"] == 3 and stats["dave_encrypting"]
    pipes = [call.play(u, 1.5, f) for u, f in zip(users, (440.0, 550.0, 660.0))]
    for p in pipes:
        assert p.done.result(6) == "ended"
    time.sleep(0.4)
    for user, freq in zip(users, (440.0, 550.0, 660.0)):
        assert_tone(heard(peer, user), freq)
        total, dave, as_plain = server_view(call.server, user)
        assert total >= 70 and dave == total  # the SFU only ever saw DAVE frames ...
        assert tone_share(as_plain, freq) < 0.2   # ... in which opuslib finds no tone
        assert call.clients[user].stats()["dave_encrypted"] >= 70
    assert peer.decrypted and not call.server.dave_hooks.rejected


def collect(client: Client, user: int) -> list:
    frames: list = []
    client.get_user(user).set_output(Output.to_callback(frames.append))
    return frames


def pcm_left(frames: list) -> np.ndarray:
    return np.frombuffer(b"".join(f.pcm for f in frames), dtype="<i2")[::2].astype(np.float64)


def test_telecom_decrypts_a_davey_peer_and_another_telecom_client(call):
    peer = call.add_peer()
    a = call.add_client()
    b = call.add_client()
    call.settled()
    from_peer = collect(a, peer.user_id)
    from_b = collect(a, b.user_id)
    frames, _ = tone_frames(550.0, 1.5)
    call.run(peer.stream(frames))
    assert call.play(b.user_id, 1.5, 660.0).done.result(6) == "ended"
    time.sleep(0.6)
    # The SFU relayed DAVE frames; telecom's receive path decrypted them with its davey session.
    total, dave, _ = server_view(call.server, peer.user_id)
    assert total >= 70 and dave >= total - 2
    assert_tone(pcm_left(from_peer), 550.0)
    assert_tone(pcm_left(from_b), 660.0)
    stats = a.stats()
    assert stats["dave_decrypted"] >= 140 and stats["receive"]["dave_failures"] <= 2


def test_member_leaves_then_rejoins(call):
    peer = call.add_peer()
    a, b, c = (call.add_client().user_id for _ in range(3))
    epoch, _ = call.settled()
    leaf_b = call.server.dave_hooks.snapshot(call.channel)["leaves"][b]
    call.remove(b)
    epoch2, code2 = call.settled()
    assert epoch2 == epoch + 1
    log = call.server.dave_hooks.snapshot(call.channel)["log"]
    assert any(e["event"] == "proposals" and e["removes"] == [b] for e in log)
    start = len(peer.audio_from(a))
    assert call.play(a, 1.2, 440.0).done.result(6) == "ended"
    time.sleep(0.3)
    assert_tone(heard(peer, a, start), 440.0)
    call.add_client(b)
    epoch3, code3 = call.settled()
    assert epoch3 == epoch2 + 1 and code3 != code2
    assert call.server.dave_hooks.snapshot(call.channel)["leaves"][b] == leaf_b
    start = len(peer.audio_from(b))
    assert call.play(b, 1.2, 660.0).done.result(6) == "ended"
    time.sleep(0.3)
    assert_tone(heard(peer, b, start), 660.0)


def test_garbage_commit_leads_to_op31_and_a_working_call(call):
    peer = call.add_peer()
    a = call.add_client().user_id
    call.settled()
    call.server.dave_hooks.corrupt_next_commit()
    call.add_client()
    call.server.wait_for_sync(lambda: call.clients[a].stats()["dave_recoveries"] >= 1, 5)
    call.server.wait_for_sync(lambda: any(e["kind"] == "invalid_commit" for e in call.events[a]), 5)
    ops = lambda: [m.get("op") for m in call.server.gateway_log(a)]  # noqa: E731
    call.server.wait_for_sync(lambda: ops().count(26) == 2, 5)  # re-initialised: a new key package
    sent31 = [m for m in call.server.gateway_log(a) if m.get("op") == 31]
    assert len(sent31) == 1 and sent31[0]["d"]["transition_id"] > 0
    assert ops().index(31) < len(ops()) - 1 - ops()[::-1].index(26)  # op 31 before the new package
    call.settled(10)
    start = len(peer.audio_from(a))
    assert call.play(a, 1.2, 440.0).done.result(6) == "ended"
    time.sleep(0.3)
    assert_tone(heard(peer, a, start), 440.0)


def test_downgrade_to_transport_only_and_back_keeps_audio_flowing(call):
    peer = call.add_peer()
    a = call.add_client().user_id
    call.settled()
    client = call.clients[a]
    from_peer = collect(client, peer.user_id)
    frames, _ = tone_frames(550.0, 7.0)
    peer_stream = asyncio.run_coroutine_threadsafe(peer.stream(frames), call.loop)
    pipe = call.play(a, 7.0, 440.0)
    time.sleep(1.0)
    call.server.dave_hooks.set_protocol_version(call.channel, 0)
    call.server.wait_for_sync(lambda: client.stats()["dave_protocol_version"] == 1
                              and not client.stats()["dave_encrypting"], 5)
    time.sleep(1.5)
    call.server.dave_hooks.set_protocol_version(call.channel, 1)
    call.settled()
    assert client.stats()["dave_encrypting"]
    assert pipe.done.result(10) == "ended"
    peer_stream.result(10)
    time.sleep(0.4)
    # Both directions kept flowing: telecom heard the peer's tone (encrypted, plain, encrypted).
    assert_tone(pcm_left(from_peer), 550.0, min_seconds=5.0)
    assert peer.sent_plain > 50 and peer.sent_encrypted > 150
    call.server.wait_for_sync(lambda: any(e["kind"] == "upgraded" for e in call.events[a]), 5)
    kinds = [e["kind"] for e in call.events[a]]
    assert kinds.index("downgraded") < kinds.index("prepare_epoch") < kinds.index("upgraded")
    packets = call.server.record(a).audio_packets()
    dave = [p.payload.endswith(FA_FA) for p in packets]
    # encrypted → plain → encrypted, in that order, on the wire
    first_plain = dave.index(False)
    last_plain = len(dave) - 1 - dave[::-1].index(False)
    assert any(dave[:first_plain]) and all(not d for d in dave[first_plain:last_plain + 1])
    assert all(dave[last_plain + 1:]) and len(dave) - last_plain > 50
    # The transport-only stretch is audible to the server; the peer heard the whole tone.
    plain = [p.payload for p in packets[first_plain:last_plain + 1]]
    assert_tone(left_channel(decode_opus(plain)), 440.0, min_seconds=0.5)
    assert_tone(heard(peer, a), 440.0, min_seconds=5.0)
    missing = sum(p is None for p in peer.audio_from(a))
    print(f"\npeer-side decrypt failures across downgrade + upgrade: {missing} of {len(peer.audio_from(a))}; "
          f"telecom-side: {client.stats()['receive']['dave_failures']}")
    assert missing < DECRYPT_FAILURE_TOLERANCE


def test_a_call_that_starts_transport_only_is_upgraded(call):
    call.server.configure_channel(call.channel, dave=False)
    peer = call.add_peer()
    client = call.add_client()
    assert client.stats()["dave_protocol_version"] == 0 and client.stats()["dave_status"] is None
    call.server.dave_hooks.set_protocol_version(call.channel, 1)
    epoch, code = call.settled()
    assert epoch == 1 and client.voice_privacy_code == code
    assert client.stats()["dave_encrypting"]
    start = len(call.server.record(client.user_id).audio_packets())
    assert call.play(client.user_id, 1.2, 440.0).done.result(6) == "ended"
    time.sleep(0.3)
    packets = call.server.record(client.user_id).audio_packets()[start:]
    assert len(packets) > 50 and all(p.payload.endswith(FA_FA) for p in packets)
    assert_tone(heard(peer, client.user_id), 440.0)


def test_decrypt_failures_around_joins_stay_below_recovery(call):
    """Measures how many of a playing client's frames a peer cannot decrypt while members join and
    leave (davey switches the sender key at process_commit, not at op 22: docs/protocol-notes.md)."""
    peer = call.add_peer()
    a = call.add_client().user_id
    call.settled()
    from_peer = collect(call.clients[a], peer.user_id)
    frames, _ = tone_frames(550.0, 6.0)
    peer_stream = asyncio.run_coroutine_threadsafe(peer.stream(frames), call.loop)
    pipe = call.play(a, 6.0, 440.0)
    time.sleep(0.8)
    b = call.add_client().user_id
    call.settled()
    time.sleep(0.5)
    call.add_peer()
    call.settled()
    time.sleep(0.5)
    call.remove(b)
    call.settled()
    assert pipe.done.result(10) == "ended"
    peer_stream.result(10)
    time.sleep(0.4)
    frames = peer.audio_from(a)
    failed = sum(p is None for p in frames)
    received = call.clients[a].stats()["receive"]["dave_failures"]
    print(f"\ndecrypt failures over 3 transitions: peer side {failed} of {len(frames)}, "
          f"telecom side {received}")
    assert failed < DECRYPT_FAILURE_TOLERANCE and received < DECRYPT_FAILURE_TOLERANCE
    assert_tone(pcm_left(from_peer), 550.0, min_seconds=4.0)
    assert call.clients[a].stats()["dave_recoveries"] == 0
    assert_tone(heard(peer, a), 440.0, min_seconds=4.0)


def test_dave_messages_missed_during_a_drop_are_replayed_on_resume(call):
    peer = call.add_peer()
    client = call.add_client()
    call.settled()
    resumed = []
    client.on("resumed", resumed.append)
    # The link dies right before the proposals for the next member: they only arrive by replay.
    call.server.dave_hooks.drop_before[client.user_id] = 27
    call.add_peer()
    epoch, _ = call.settled(10)
    assert epoch == 2 and resumed and client.user_id not in call.server.dave_hooks.drop_before
    assert [m["op"] for m in call.server.gateway_log(client.user_id)].count(7) == 1  # one op 7 Resume
    assert client.stats()["dave_recoveries"] == 0
    start = len(peer.audio_from(client.user_id))
    assert call.play(client.user_id, 1.2, 440.0).done.result(6) == "ended"
    time.sleep(0.3)
    assert_tone(heard(peer, client.user_id, start), 440.0)


def test_full_reconnect_rejoins_the_group_with_a_new_key_package(call):
    peer = call.add_peer()
    client = call.add_client()
    epoch, code = call.settled()
    first_session = client._dave
    call.server.close_client(client.user_id, 4011)  # not resumable: the member leaves, then identifies
    # The peer is left alone (sole-member reset), then the client's new key package forms a new group.
    log = lambda: call.server.dave_hooks.snapshot(call.channel)["log"]  # noqa: E731
    call.server.wait_for_sync(lambda: any(e["event"] == "sole_member_reset" for e in log()), 5)
    epoch2, code2 = call.settled(10)
    assert epoch2 == 1 and code2 != code
    assert client._dave is not first_session
    assert [m["op"] for m in call.server.gateway_log(client.user_id)].count(0) == 2  # two Identifies
    start = len(peer.audio_from(client.user_id))
    assert call.play(client.user_id, 1.2, 440.0).done.result(6) == "ended"
    time.sleep(0.3)
    assert_tone(heard(peer, client.user_id, start), 440.0)


def test_client_without_dave_gets_a_clear_4017(dave_server):
    guild, channel, user = new_ids()
    creds = dave_server.create_session(guild, channel, user)
    client = Client(user, guild, creds.session_id, channel_id=channel,
                    gateway_config=GatewayConfig(max_dave_protocol_version=0))
    client.set_server_info(dave_server.url, creds.token)
    with pytest.raises(GatewayError, match="E2EE/DAVE") as info:
        client.wait_ready(10)
    assert info.value.code == 4017
    client.close()


# -- the state machine alone, against a scripted gateway ------------------------------------------------

class FakeGateway:
    def __init__(self) -> None:
        self.sent: list[tuple[int, object]] = []
        self.events: list[tuple[str, dict]] = []

    def manager(self, user: int = 10, channel: int = 20) -> DaveSessionManager:
        return DaveSessionManager(
            user, channel, 1, send_json=lambda op, d: self.sent.append((op, d)),
            send_binary=lambda op, p: self.sent.append((op, p)),
            emit=lambda kind, **data: self.events.append((kind, data)))

    def ops(self) -> list[int]:
        return [op for op, _ in self.sent]


def _two_member_group(ext: mls.ExternalSender, gw: FakeGateway, channel: int = 20):
    """telecom's manager (user 10) + a raw davey session (user 11) in one group via our external sender."""
    manager = gw.manager(10, channel)
    manager.start()
    other = davey.DaveSession(1, 11, channel)
    manager.users_connected([11])
    manager.handle(25, ext.serialize())
    other.set_external_sender(ext.serialize())
    kp = gw.sent[0][1]
    add = ext.proposal(channel.to_bytes(8, "big"), 0, mls.add_proposal(kp))
    cw = other.process_proposals(davey.ProposalsOperationType.append,
                                 mls.append_proposals_payload([add.message])[1:])
    other.process_commit(cw.commit)
    manager.handle(30, b"\x00\x05" + cw.welcome)
    return manager, other


def test_manager_joins_by_welcome_sends_ready_and_executes():
    ext, gw = mls.ExternalSender(), FakeGateway()
    manager, other = _two_member_group(ext, gw)
    assert gw.sent[0][0] == 26 and gw.sent[-1] == (23, {"transition_id": 5})
    assert manager.epoch == 1 and manager.voice_privacy_code == other.voice_privacy_code
    assert manager.can_encrypt
    frame = manager.encrypt(b"opus frame bytes")
    assert frame.endswith(FA_FA) and other.decrypt(10, davey.MediaType.audio, frame) == b"opus frame bytes"
    assert manager.encrypt(b"\xf8\xff\xfe") == b"\xf8\xff\xfe"
    assert manager.decrypt(11, other.encrypt_opus(b"from the other side")) == b"from the other side"
    manager.handle(22, {"transition_id": 5})
    assert ("transition_executed", {"transition_id": 5, "protocol_version": 1}) in gw.events


def test_manager_refuses_an_unexpected_member_and_passes_expected_ids():
    ext, gw = mls.ExternalSender(), FakeGateway()
    manager = gw.manager(10, 20)
    manager.start()
    manager.handle(25, ext.serialize())
    stranger = davey.DaveSession(1, 99, 20)
    add = ext.proposal((20).to_bytes(8, "big"), 0, mls.add_proposal(stranger.get_serialized_key_package()))
    manager.handle(27, mls.append_proposals_payload([add.message]))
    assert 28 not in gw.ops()  # user 99 was never announced by op 11: no commit
    assert any(kind == "error" for kind, _ in gw.events)
    manager.users_connected([99])
    manager.handle(27, mls.append_proposals_payload([add.message]))
    assert 28 in gw.ops()


def test_sustained_decrypt_failures_send_op31_and_a_new_key_package():
    ext, gw = mls.ExternalSender(), FakeGateway()
    manager, other = _two_member_group(ext, gw)
    manager.handle(22, {"transition_id": 5})
    before = len(gw.sent)
    junk = b"\x01" * 20 + b"\x01\x0c\xfa\xfa"
    for _ in range(DECRYPT_FAILURE_TOLERANCE - 1):
        assert manager.decrypt(11, junk) is None
    assert len(gw.sent) == before
    assert manager.decrypt(11, junk) is None
    assert gw.ops()[before:] == [31, 26]
    assert gw.sent[before] == (31, {"transition_id": 5})
    assert manager.stats()["dave_recoveries"] == 1 and manager.status == "pending"


def test_plain_frames_from_a_peer_are_dropped_but_do_not_trigger_recovery():
    ext, gw = mls.ExternalSender(), FakeGateway()
    manager, _ = _two_member_group(ext, gw)
    manager.handle(22, {"transition_id": 5})
    for _ in range(DECRYPT_FAILURE_TOLERANCE * 3):
        assert manager.decrypt(11, b"plain opus from a re-initialising peer") is None
    assert 31 not in gw.ops() and manager.stats()["dave_decrypt_failures"] == DECRYPT_FAILURE_TOLERANCE * 3


def test_no_recovery_while_a_transition_is_pending():
    ext, gw = mls.ExternalSender(), FakeGateway()
    manager, _ = _two_member_group(ext, gw)  # transition 5 still pending (no op 22 yet)
    for _ in range(DECRYPT_FAILURE_TOLERANCE * 2):
        manager.decrypt(11, b"\x02" * 24 + b"\x01\x0c\xfa\xfa")
    assert 31 not in gw.ops()


def test_garbage_commit_recovers_and_sole_member_reset():
    ext, gw = mls.ExternalSender(), FakeGateway()
    manager, _ = _two_member_group(ext, gw)
    manager.handle(22, {"transition_id": 5})
    manager.handle(29, b"\x00\x07" + b"\x00\x01\x00\x01garbage")
    assert gw.ops()[-2:] == [31, 26] and gw.sent[-2][1] == {"transition_id": 7}
    assert not manager.can_encrypt and manager.encrypt(b"plain until ready") == b"plain until ready"
    # Sole member reset: op 24 epoch 1 then op 21 id 0 → a fresh key package, executed at once.
    n = len(gw.sent)
    manager.handle(24, {"protocol_version": 1, "epoch": 1})
    manager.handle(21, {"protocol_version": 1, "transition_id": 0})
    assert gw.ops()[n:] == [26] and manager.pending_transitions == {}


def test_downgrade_passthrough_and_plain_sending():
    ext, gw = mls.ExternalSender(), FakeGateway()
    manager, other = _two_member_group(ext, gw)
    manager.handle(22, {"transition_id": 5})
    manager.handle(21, {"protocol_version": 0, "transition_id": 6})
    assert gw.sent[-1] == (23, {"transition_id": 6})
    assert manager.can_encrypt  # the sender switches at execute, not at prepare
    assert manager.decrypt(11, b"plain from an early peer") == b"plain from an early peer"
    manager.handle(22, {"transition_id": 6})
    assert not manager.can_encrypt and manager.encrypt(b"opus") == b"opus"
    assert manager.decrypt(11, b"plain opus") == b"plain opus"
    assert [k for k, _ in gw.events].count("downgraded") == 1


@pytest.mark.parametrize("op", [29, 30], ids=["announce_commit", "welcome"])
def test_connection_killed_mid_transition_resumes_into_a_consistent_group(call, op):
    # The websocket dies right before the transition's commit (op 29, an existing member) or the
    # Welcome (op 30, the joiner) goes out, while audio is playing; after the resume replays it, every
    # member is in the same epoch and the audio decrypts end to end.
    peer = call.add_peer()
    old = call.add_client()
    call.settled()
    music = call.play(old.user_id, 4.0, 440.0)
    time.sleep(0.5)
    if op == 29:
        call.server.dave_hooks.drop_before[old.user_id] = 29
        new = call.add_client()
        victim = old
    else:
        # The joiner's Welcome: arm the fault for its user id before it joins.
        user = call.user()
        call.server.dave_hooks.drop_before[user] = 30
        new = call.add_client(user)
        victim = new
    epoch, code = call.settled(12)
    assert epoch == 2 and victim.user_id not in call.server.dave_hooks.drop_before
    ops = [m["op"] for m in call.server.gateway_log(victim.user_id)]
    assert ops.count(7) == 1 and ops.count(0) == 1  # resumed once, never re-identified
    assert victim.stats()["dave_recoveries"] == 0
    assert music.done.result(8) == "ended"
    # After the transition both telecom clients are heard by the independent peer.
    starts = {c.user_id: len(peer.audio_from(c.user_id)) for c in (old, new)}
    pipes = [call.play(old.user_id, 1.2, 550.0), call.play(new.user_id, 1.2, 660.0)]
    for p in pipes:
        assert p.done.result(6) == "ended"
    time.sleep(0.4)
    assert_tone(heard(peer, old.user_id, starts[old.user_id]), 550.0)
    assert_tone(heard(peer, new.user_id, starts[new.user_id]), 660.0)
