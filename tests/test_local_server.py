"""The local voice server, driven by a scripted client that shares no code with it or with telecom."""

from __future__ import annotations

import asyncio
import math
import ssl

import aiohttp
import pytest

from telecom.testing import LocalVoiceServer
from voiceclient_script import (
    AES, OMIT, SILENCE, XCHACHA, ScriptedVoiceClient, analyse, decode_opus, tone_frames,
)

GUILD = 100000000000000001
CHANNEL = 100000000000000002
ALICE = 200000000000000001
BOB = 200000000000000002
AMPLITUDE = 0.3


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def client(server: LocalVoiceServer, user_id: int, channel_id: int = CHANNEL, **kw) -> ScriptedVoiceClient:
    creds = server.create_session(GUILD, channel_id, user_id)
    return ScriptedVoiceClient.for_credentials(creds, server.url, **kw)


def assert_tone(pcm: bytes, freq: float) -> None:
    measured, rms = analyse(pcm)
    assert abs(measured - freq) <= 2, measured
    expected_rms = AMPLITUDE * 32767 / math.sqrt(2)
    level_db = 20 * math.log10(rms / expected_rms)
    assert abs(level_db) < 1.5, level_db


# -- handshake and a recorded tone ----------------------------------------------------------------


@pytest.mark.parametrize("mode", [AES, XCHACHA])
@pytest.mark.parametrize("dave", [False, True])
def test_handshake_and_tone_recorded(mode, dave):
    async def main():
        async with LocalVoiceServer(dave=dave) as server:
            alice = client(server, ALICE)
            try:
                desc = await alice.handshake(mode, max_dave=1 if dave else 0)
                ready = alice.ready
                assert ready["ip"] == "127.0.0.1" and ready["port"] == server.udp_port
                assert ready["modes"] == [AES, XCHACHA]
                assert alice.discovered[0] == "127.0.0.1"
                assert desc["mode"] == mode and desc["audio_codec"] == "opus"
                assert len(desc["secret_key"]) == 32 and all(0 <= b <= 255 for b in desc["secret_key"])
                assert desc["dave_protocol_version"] == (1 if dave else 0)
                assert server.ssrc_of(ALICE) == alice.ssrc
                assert server.members(CHANNEL) == [ALICE]

                frames, _ = tone_frames(440, 1.0, AMPLITUDE)
                await alice.speaking(1)
                await alice.send_stream(frames)
                await server.wait_for(lambda: len(server.record(ALICE).packets) == len(frames) + 5, 5)
                record = server.record(ALICE)
                assert record.silence_frames == 5
                assert [p.payload for p in record.packets[:-5]] == frames
                assert record.speaking_events and record.speaking_events[0][1] == 1
                assert_tone(record.pcm(), 440)
                assert len(record.pcm()) == (len(frames) + 5) * 960 * 4
                await asyncio.sleep(0.3)  # past the audio-before-speaking grace
                assert server.violations() == []
            finally:
                await alice.close()

    run(main())


def test_wss_with_generated_ca():
    async def main():
        async with LocalVoiceServer(tls=True, dave=False) as server:
            assert server.url.startswith("wss://127.0.0.1:")
            # Verification is on: without the CA the handshake must fail.
            plain = client(server, BOB, ssl=ssl.create_default_context())
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await plain.connect()
            await plain.close()
            alice = client(server, ALICE, ssl=server.ssl_context())
            try:
                desc = await alice.handshake(XCHACHA, max_dave=0)
                assert desc["mode"] == XCHACHA
                with open(server.ca_file) as f:
                    assert "BEGIN CERTIFICATE" in f.read()
            finally:
                await alice.close()

    run(main())


# -- gateway rules ------------------------------------------------------------------------------


def test_wrong_token_closes_4004():
    async def main():
        async with LocalVoiceServer(dave=False) as server:
            alice = client(server, ALICE)
            await alice.connect()
            await alice.identify(max_dave=0, token="not-the-token")
            assert await alice.wait_closed() == 4004
            await alice.close()

    run(main())


def test_dave_channel_without_max_dave_closes_4017():
    async def main():
        async with LocalVoiceServer(dave=True) as server:
            for max_dave in (OMIT, 0):
                alice = client(server, ALICE)
                await alice.connect()
                await alice.identify(max_dave=max_dave)
                assert await alice.wait_closed() == 4017
                assert not any(m["op"] == 2 for m in alice.messages)
                await alice.close()
            # A DAVE-off channel on the same server lets the same client in.
            server.configure_channel(CHANNEL + 1, dave=False)
            bob = client(server, BOB, channel_id=CHANNEL + 1)
            desc = await bob.handshake(AES, max_dave=1)
            assert desc["dave_protocol_version"] == 0
            await bob.close()

    run(main())


def test_unknown_ops_tolerated_heartbeat_echo_and_seq():
    async def main():
        async with LocalVoiceServer(dave=False, heartbeat_interval=5) as server:
            alice = client(server, ALICE)
            hello = await alice.connect()
            assert hello["d"] == {"v": 8, "heartbeat_interval": 5000} and "seq" not in hello
            await alice.identify(max_dave=0)
            ready = await alice.wait_op(2)
            for op in (12, 14, 15, 16, 18, 20, 99):
                await alice.send(op, {"whatever": op})
            ack = await alice.heartbeat(1234567)
            assert ack["d"] == {"t": 1234567}
            await alice.discover(ready["d"])
            alice.ssrc = ready["d"]["ssrc"]
            await alice.send(1, {"protocol": "udp", "data": {"address": "127.0.0.1", "port": 1, "mode": AES}})
            desc = await alice.wait_op(4)
            await alice.speaking(1)
            assert not alice.closed.is_set()
            seqs = [m["seq"] for m in alice.messages if "seq" in m]
            assert [ready["seq"], desc["seq"]] == seqs[:2]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and seqs[0] == 1
            log_ops = [m["op"] for m in server.gateway_log(ALICE)]
            assert log_ops[:9] == [0, 12, 14, 15, 16, 18, 20, 99, 3]
            await alice.close()

    run(main())


@pytest.mark.parametrize(
    "script, code",
    [
        ("op_before_identify", 4003),
        ("identify_twice", 4005),
        ("bad_json", 4002),
        ("protocol_not_udp", 4012),
        ("mode_not_offered", 4016),
        ("no_version", 4020),
        ("old_version", 4020),
    ],
)
def test_gateway_close_codes(script, code):
    async def main():
        async with LocalVoiceServer(dave=False, modes=[XCHACHA]) as server:
            alice = client(server, ALICE)
            if script in ("no_version", "old_version"):
                alice._http = aiohttp.ClientSession()
                query = "" if script == "no_version" else "?v=3"
                alice.ws = await alice._http.ws_connect(server.url + query)
                msg = await alice.ws.receive()
                assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == code
                await alice._http.close()
                return
            await alice.connect()
            if script == "op_before_identify":
                await alice.send(5, {"speaking": 1, "delay": 0, "ssrc": 1})
            elif script == "bad_json":
                await alice.ws.send_str("{not json")
            else:
                await alice.identify(max_dave=0)
                await alice.wait_op(2)
                if script == "identify_twice":
                    await alice.identify(max_dave=0)
                else:
                    mode = AES if script == "mode_not_offered" else XCHACHA
                    protocol = "webrtc" if script == "protocol_not_udp" else "udp"
                    data = {"address": "127.0.0.1", "port": 9, "mode": mode}
                    await alice.send(1, {"protocol": protocol, "data": data})
            assert await alice.wait_closed() == code
            await alice.close()

    run(main())


def test_heartbeat_timeout_closes_4009_and_ends_session():
    async def main():
        async with LocalVoiceServer(dave=False, heartbeat_interval=0.2) as server:
            alice = client(server, ALICE)
            await alice.connect()
            await alice.identify(max_dave=0)
            await alice.wait_op(2)
            assert await alice.wait_closed(3) == 4009
            assert server.members(CHANNEL) == []
            await alice.close()

    run(main())


# -- resume ---------------------------------------------------------------------------------


def test_resume_replays_missed_messages_in_order():
    async def main():
        async with LocalVoiceServer(dave=False) as server:
            alice = client(server, ALICE)
            bob = client(server, BOB)
            try:
                await alice.handshake(AES, max_dave=0)
                ssrc = alice.ssrc
                seen = alice.last_seq
                server.drop_client(ALICE)
                assert await alice.wait_closed() not in (None, 1000, 4006)
                assert server.members(CHANNEL) == [ALICE]  # still a member during the grace

                await bob.handshake(XCHACHA, max_dave=0)
                await bob.speaking(1)
                await server.wait_for(lambda: server.session_of(ALICE).seq >= seen + 2, 5)

                # Reconnect with op 7 and the last seq seen.
                old_ws_messages = len(alice.messages)
                await alice.ws.close()
                await alice._http.close()
                await alice.connect()
                start = len(alice.messages)
                assert start == old_ws_messages + 1  # just the new Hello
                await alice.send(7, {"server_id": str(GUILD), "session_id": alice.session_id,
                                     "token": alice.token, "seq_ack": seen})
                await alice.wait_for(lambda: len(alice.messages) >= start + 3)
                resumed, connect, speaking = alice.messages[start : start + 3]
                assert resumed["op"] == 9 and "seq" not in resumed
                assert connect == {"op": 11, "d": {"user_ids": [str(BOB)]}, "seq": seen + 1}
                assert speaking == {"op": 5, "d": {"user_id": str(BOB), "ssrc": bob.ssrc, "speaking": 1},
                                    "seq": seen + 2}
                # The UDP side is untouched: same SSRC, same key, audio still accepted.
                assert server.ssrc_of(ALICE) == ssrc
                await alice.speaking(1)
                frames, _ = tone_frames(440, 0.1)
                await alice.send_stream(frames, silence_after=0)
                await server.wait_for(lambda: len(server.record(ALICE).packets) == len(frames), 5)
                # Bob got alice's audio, relayed.
                await bob.wait_for(lambda: len(bob.udp.rtp) == len(frames))
                assert {p.ssrc for p in bob.received()} == {ssrc}
            finally:
                await alice.close()
                await bob.close()

    run(main())


def test_resume_rejected_with_4006():
    async def main():
        async with LocalVoiceServer(dave=False, resume_buffer=2) as server:
            # Unknown session.
            stranger = client(server, ALICE)
            await stranger.connect()
            await stranger.send(7, {"server_id": str(GUILD), "session_id": "nope", "token": "x",
                                    "seq_ack": 1})
            assert await stranger.wait_closed() == 4006
            await stranger.close()

            # The buffer (2 messages) no longer covers seq_ack.
            alice = client(server, ALICE, channel_id=CHANNEL + 7)
            await alice.handshake(AES, max_dave=0)
            seen = alice.last_seq
            server.drop_client(ALICE)
            await alice.wait_closed()
            for user in (BOB, BOB + 1, BOB + 2):
                other = client(server, user, channel_id=CHANNEL + 7)
                await other.handshake(AES, max_dave=0)
                await other.close(4000)  # a resumable close: stays a member
            await server.wait_for(lambda: server.session_of(ALICE).seq >= seen + 3, 5)
            await alice.close()
            await alice.connect()
            await alice.send(7, {"server_id": str(GUILD), "session_id": alice.session_id,
                                 "token": alice.token, "seq_ack": seen})
            assert await alice.wait_closed() == 4006
            await alice.close()
            # The refused op 7 presented alice's credentials, so it is in her log (the stranger's is not).
            assert [m["op"] for m in server.gateway_log(ALICE)].count(7) == 1

            # A session ended by the server (4014) cannot be resumed either.
            bob = client(server, BOB + 9)
            await bob.handshake(AES, max_dave=0)
            server.close_client(BOB + 9, 4014, "kicked")
            assert await bob.wait_closed() == 4014
            await bob.close()
            await bob.connect()
            await bob.send(7, {"server_id": str(GUILD), "session_id": bob.session_id,
                               "token": bob.token, "seq_ack": bob.last_seq})
            assert await bob.wait_closed() == 4006
            await bob.close()

    run(main())


# -- members and the SFU relay ----------------------------------------------------------------


def test_two_clients_hear_each_other_through_the_relay():
    async def main():
        async with LocalVoiceServer(dave=False) as server:
            alice = client(server, ALICE)
            bob = client(server, BOB)
            try:
                await alice.handshake(AES, max_dave=0)
                await bob.handshake(XCHACHA, max_dave=0)
                # Clients Connect both ways.
                assert (await alice.wait_op(11))["d"] == {"user_ids": [str(BOB)]}
                assert (await bob.wait_op(11))["d"] == {"user_ids": [str(ALICE)]}
                a_frames, _ = tone_frames(440, 1.0, AMPLITUDE)
                b_frames, _ = tone_frames(660, 1.0, AMPLITUDE)
                await alice.speaking(1)
                await bob.speaking(1)
                # Speaking is forwarded with the user id, so receivers can map SSRC -> user.
                fwd = await bob.wait_op(5)
                assert fwd["d"] == {"user_id": str(ALICE), "ssrc": alice.ssrc, "speaking": 1}
                await asyncio.gather(alice.send_stream(a_frames), bob.send_stream(b_frames))
                total = len(a_frames) + 5
                await alice.wait_for(lambda: len(alice.udp.rtp) >= total)
                await bob.wait_for(lambda: len(bob.udp.rtp) >= total)

                for me, other, frames, freq in ((alice, bob, b_frames, 660), (bob, alice, a_frames, 440)):
                    got = me.received()
                    assert {p.ssrc for p in got} == {other.ssrc}
                    assert all(p.extension and p.extension_profile == 0xBEDE for p in got)
                    assert all(len(p.extension_body) == 4 for p in got)
                    assert [p.sequence for p in got] == [(1000 + i) & 0xFFFF for i in range(total)]
                    assert [p.timestamp for p in got] == [123456 + 960 * i for i in range(total)]
                    # The receiver-specific transport nonce counter goes up by one.
                    counters = [p.counter for p in got]
                    assert counters == list(range(counters[0], counters[0] + total))
                    assert [p.payload for p in got] == frames + [SILENCE] * 5
                    assert_tone(decode_opus([p.payload for p in got]), freq)
                await asyncio.sleep(0.3)
                assert server.violations() == []

                # Bob leaves with a normal close: alice is told (op 13).
                await bob.close(1000)
                left = await alice.wait_op(13)
                assert left["d"] == {"user_id": str(BOB)}
                assert server.members(CHANNEL) == [ALICE]
            finally:
                await alice.close()
                await bob.close()

    run(main())


def test_relay_faults_loss_and_duplicate():
    async def main():
        async with LocalVoiceServer(dave=False) as server:
            alice = client(server, ALICE)
            bob = client(server, BOB)
            try:
                await alice.handshake(AES, max_dave=0)
                await bob.handshake(AES, max_dave=0)
                await alice.speaking(1)
                frames, _ = tone_frames(440, 0.2)
                server.faults.relay_duplicate = 1.0
                await alice.send_stream(frames, silence_after=0)
                await bob.wait_for(lambda: len(bob.udp.rtp) >= 2 * len(frames))
                seqs = [p.sequence for p in bob.received()]
                assert seqs == [s for s in range(1000, 1000 + len(frames)) for _ in (0, 1)]

                server.faults.relay_duplicate = 0.0
                server.faults.relay_reorder = 1.0  # every other packet held back behind its successor
                before = len(bob.udp.rtp)
                await alice.send_stream(frames[:6], silence_after=0, start_timestamp=500000,
                                        sequences=list(range(3000, 3006)), counters=list(range(300, 306)))
                await bob.wait_for(lambda: len(bob.udp.rtp) >= before + 6)
                assert [p.sequence for p in bob.received()[before:]] == [3001, 3000, 3003, 3002, 3005, 3004]

                server.faults.relay_reorder = 0.0
                server.faults.relay_loss = 0.5
                server.faults.seed = 7
                before = len(bob.udp.rtp)
                await alice.send_stream(frames * 5, silence_after=0, start_timestamp=900000,
                                        sequences=list(range(2000, 2000 + 5 * len(frames))),
                                        counters=list(range(500, 500 + 5 * len(frames))))
                await server.wait_for(lambda: len(server.record(ALICE).packets) == 6 * len(frames) + 6, 5)
                await asyncio.sleep(0.1)
                got = len(bob.udp.rtp) - before
                assert 0 < got < 5 * len(frames)
                # earlier phases sent len(frames) + 6
                assert got == server.stats()["relayed"] - len(frames) - 6
            finally:
                await alice.close()
                await bob.close()

    run(main())


# -- validation: bad clients are flagged with exactly the expected kind --------------------------


@pytest.mark.parametrize(
    "fault", ["audio_before_speaking", "sequence_jump", "nonce_reused", "payload_type", "decrypt_failed",
              "timestamp_jump"]
)
def test_bad_client_flagged(fault):
    async def main():
        async with LocalVoiceServer(dave=False) as server:
            alice = client(server, ALICE)
            try:
                await alice.handshake(XCHACHA, max_dave=0)
                frames, _ = tone_frames(440, 0.2)
                n = len(frames) + 5
                if fault != "audio_before_speaking":
                    await alice.speaking(1)
                if fault == "sequence_jump":
                    seqs = [(65530 + i + (i >= 4)) & 0xFFFF for i in range(n)]  # wraps fine, skips one
                    await alice.send_stream(frames, sequences=seqs)
                elif fault == "nonce_reused":
                    counters = [0, 1, 2, 2, 3] + list(range(4, n - 1))
                    await alice.send_stream(frames, counters=counters)
                elif fault == "timestamp_jump":
                    await alice.send_stream(frames, silence_after=5)
                    # A restart right away (no time has passed) but the timestamp jumps 10 s.
                    await alice.send_stream(frames, start_timestamp=123456 + 960 * (n + 500),
                                            sequences=[(1000 + n + i) for i in range(n)],
                                            counters=list(range(7 + n, 7 + 2 * n)))
                elif fault in ("payload_type", "decrypt_failed"):
                    await alice.send_stream(frames[:3], silence_after=0)
                    if fault == "payload_type":
                        alice.send_raw(alice.seal(frames[3], 1003, 123456 + 960 * 3, 10, payload_type=0x60))
                    else:
                        alice.send_raw(alice.seal(frames[3], 1003, 123456 + 960 * 3, 10, key=bytes(32)))
                else:
                    await alice.send_stream(frames)
                await asyncio.sleep(0.35)  # let the speaking grace run out
                kinds = [v.kind for v in server.violations(ALICE)]
                assert kinds == [fault], server.violations()
                assert all(v.user_id == ALICE and v.ssrc == alice.ssrc for v in server.violations())
            finally:
                await alice.close()

    run(main())


def test_speaking_with_wrong_ssrc_and_identify_field_types_flagged():
    async def main():
        async with LocalVoiceServer(dave=False) as server:
            alice = client(server, ALICE)
            try:
                await alice.connect()
                await alice.identify(max_dave=OMIT, user_id=ALICE)  # int, not a string snowflake
                ready = await alice.wait_op(2)
                alice.ssrc = ready["d"]["ssrc"]
                await alice.speaking(1, ssrc=alice.ssrc + 1)
                await server.wait_for(lambda: len(server.violations(ALICE)) == 3, 5)
                kinds = sorted(v.kind for v in server.violations(ALICE))
                assert kinds == ["identify_fields", "identify_fields", "speaking_ssrc"]
            finally:
                await alice.close()

    run(main())


# -- running in a background thread ----------------------------------------------------------


def test_background_thread_mode():
    server = LocalVoiceServer(dave=False)
    server.start_background()
    try:
        creds = server.create_session(GUILD, CHANNEL, ALICE)
        assert creds.endpoint == server.endpoint and "token" not in repr(creds)

        async def join():
            alice = ScriptedVoiceClient.for_credentials(creds, server.url)
            await alice.handshake(AES, max_dave=0)
            return alice

        async def scenario():
            alice = await join()
            # Queries from this (non-server) thread see the server's state.
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: server.wait_for_sync(lambda: server.members(CHANNEL) == [ALICE], 5)
            )
            server.close_client(ALICE, 4022, "call terminated")
            code = await alice.wait_closed()
            await alice.close()
            return code

        assert asyncio.run(scenario()) == 4022
        assert server.wait_for_sync(lambda: server.members(CHANNEL) == [], 5)
    finally:
        server.stop_background()
