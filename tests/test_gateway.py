"""telecom.gateway against the local voice server on loopback: handshake, heartbeats, resume, close codes.

Every test runs a real websocket to :class:`telecom.testing.LocalVoiceServer` and checks what a user
of the gateway sees (listener callbacks, SessionInfo) and what the server received (its gateway log).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import pytest

from telecom.errors import ConfigurationError, ConnectTimeout, GatewayError
from telecom.gateway import GatewayConfig, SessionInfo, VoiceGateway, choose_mode, voice_gateway_url
from telecom.protocol import CLOSE_ACTIONS, CloseCode, Opcode, SpeakingFlags, close_action
from telecom.testing import LocalVoiceServer
from telecom.testing import gateway as server_gateway

AES = "aead_aes256_gcm_rtpsize"
XCHACHA = "aead_xchacha20_poly1305_rtpsize"
GUILD, CHANNEL = 111, 222


# -- pure functions -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "endpoint, url",
    [
        ("sweetwater-12345.discord.media:2048", "wss://sweetwater-12345.discord.media:2048/?v=8"),
        ("c-fra07-1a2b3c4d.discord.media:443", "wss://c-fra07-1a2b3c4d.discord.media:443/?v=8"),
        ("  sweetwater-1.discord.media:2048 ", "wss://sweetwater-1.discord.media:2048/?v=8"),
        ("voice.example.org", "wss://voice.example.org/?v=8"),
        ("127.0.0.1:4000", "wss://127.0.0.1:4000/?v=8"),
        ("[::1]:4000", "wss://[::1]:4000/?v=8"),
        ("ws://127.0.0.1:4000/", "ws://127.0.0.1:4000/?v=8"),
        ("ws://127.0.0.1:4000", "ws://127.0.0.1:4000/?v=8"),
        ("WSS://Host.example:1/voice?x=1", "wss://Host.example:1/voice?x=1&v=8"),
        ("wss://h.example:1/?v=7", "wss://h.example:1/?v=7"),  # an explicit version is kept
    ],
)
def test_voice_gateway_url(endpoint, url):
    assert voice_gateway_url(endpoint) == url


@pytest.mark.parametrize(
    "endpoint",
    ["", "   ", None, 2048, "https://h.example:443", "host:port", "host:99999", "host:0", "h.example:1/path",
     "h.example:1?v=8", "user@h.example:1", "bad host:1", "h..example:1", "[::zz]:1", "ws://", "ftp://x"],
)
def test_voice_gateway_url_rejects_junk(endpoint):
    with pytest.raises(ConfigurationError):
        voice_gateway_url(endpoint)


def test_choose_mode_prefers_aes_gcm():
    assert choose_mode([XCHACHA, AES]) == AES
    assert choose_mode(["xsalsa20_poly1305", XCHACHA]) == XCHACHA
    with pytest.raises(GatewayError):
        choose_mode(["xsalsa20_poly1305_lite", "aead_aes256_gcm"])  # both discontinued in 2024


def test_close_actions_follow_the_spec():
    assert close_action(None) == "resume"  # a drop with no close frame
    assert close_action(1006) == close_action(1000) == close_action(4015) == "resume"
    for code in (4002, 4012, 4016, 4017, 4020, 4021):
        assert CLOSE_ACTIONS[code] == "fatal"
    assert close_action(4004) == close_action(4006) == close_action(4009) == "new_session"
    assert close_action(4014) == close_action(4022) == "wait_server_update"
    actions = {"resume", "reconnect", "wait_server_update", "new_session", "fatal"}
    assert set(CLOSE_ACTIONS.values()) <= actions
    assert SpeakingFlags.MICROPHONE | SpeakingFlags.PRIORITY == 5
    assert Opcode.DAVE_MLS_WELCOME == 30 and CloseCode.E2EE_REQUIRED == 4017


def test_session_info_repr_hides_the_key():
    key = bytes(range(32))
    info = SessionInfo(ssrc=1, ip="127.0.0.1", port=1, mode=AES, secret_key=key, dave_protocol_version=0,
                       sock=None, external_ip="127.0.0.1", external_port=2)
    text = repr(info)
    assert "secret_key" not in text and key.hex() not in text and str(list(key)) not in text


# -- harness --------------------------------------------------------------------------------------


def async_test(fn):
    """Run an async test in a fresh loop; fail if an exception reached the loop's handler."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        problems = []

        async def main():
            asyncio.get_running_loop().set_exception_handler(lambda loop, context: problems.append(context))
            await asyncio.wait_for(fn(*args, **kwargs), 30)

        asyncio.run(main())
        assert not problems, problems

    return wrapper


class Recorder:
    """A GatewayListener that records every callback."""

    def __init__(self):
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, name):
        if not name.startswith("on_"):
            raise AttributeError(name)
        return lambda *args: self.calls.append((name[3:], args))

    def on_state(self, state, detail=""):
        self.calls.append(("state", (state, detail)))
        if state == "resuming" and self.when_resuming is not None:
            self.when_resuming()

    when_resuming = None

    def of(self, name):
        return [args for called, args in self.calls if called == name]

    def names(self):
        return [name for name, _ in self.calls if name != "state"]

    async def wait(self, name, count=1, timeout=10.0):
        deadline = time.monotonic() + timeout
        while len(self.of(name)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count}× on_{name} within {timeout} s; got {self.names()}")
            await asyncio.sleep(0.005)
        return self.of(name)[count - 1]

    @property
    def session(self) -> SessionInfo:
        return self.of("session")[-1][0]


class Connected:
    def __init__(self, gateway, task, recorder, creds):
        self.gateway, self.task, self.recorder, self.creds = gateway, task, recorder, creds

    async def close(self):
        await self.gateway.close()
        await asyncio.wait_for(self.task, 5)


def start(server, user_id, *, channel=CHANNEL, endpoint=None, token=None, ssl=None, creds=None, recorder=None,
          **config):
    creds = creds or server.create_session(GUILD, channel, user_id)
    recorder = recorder or Recorder()
    config.setdefault("connect_timeout", 5.0)
    config.setdefault("backoff_base", 0.01)
    gateway = VoiceGateway(
        endpoint=endpoint or server.url,
        server_id=creds.guild_id,
        user_id=creds.user_id,
        session_id=creds.session_id,
        token=creds.token if token is None else token,
        listener=recorder,
        ssl=ssl,
        config=GatewayConfig(**config),
    )
    return Connected(gateway, asyncio.ensure_future(gateway.run()), recorder, creds)


async def connect(server, user_id, **kwargs):
    client = start(server, user_id, **kwargs)
    await client.recorder.wait("session")
    return client


def sent(server, user_id, op):
    return [m for m in server.gateway_log(user_id) if m.get("op") == op]


@pytest.fixture
def count_sockets(monkeypatch):
    """How many websockets the local server accepted (wraps its per-socket constructor)."""
    opened = []
    original = server_gateway.GatewayConnection.__init__

    def counting(self, *args, **kwargs):
        opened.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(server_gateway.GatewayConnection, "__init__", counting)
    return opened


# -- handshake ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dave", [False, True], ids=["dave-off", "dave-on"])
@pytest.mark.parametrize(
    "modes, expected", [((AES, XCHACHA), AES), ((XCHACHA,), XCHACHA)], ids=["aes", "xchacha"]
)
@async_test
async def test_handshake(dave, modes, expected):
    async with LocalVoiceServer(dave=True, modes=modes) as server:
        server.configure_channel(CHANNEL, dave=dave)
        client = await connect(server, 7, udp_keepalive_interval=0.05)
        info = client.recorder.session
        assert info.ssrc == server.ssrc_of(7) == client.gateway.ssrc
        assert info.mode == expected
        assert info.secret_key == server.session_of(7).secret_key and len(info.secret_key) == 32
        assert info.dave_protocol_version == (1 if dave else 0)
        # IP discovery found the address the server saw our socket at, and Select Protocol carried it
        assert (info.external_ip, info.external_port) == info.sock.getsockname()
        select = sent(server, 7, Opcode.SELECT_PROTOCOL)[0]["d"]
        assert select == {"protocol": "udp", "data": {"address": "127.0.0.1", "port": info.external_port,
                                                       "mode": expected}}
        identify = sent(server, 7, Opcode.IDENTIFY)[0]["d"]
        assert identify["max_dave_protocol_version"] == 1
        assert identify["server_id"] == str(GUILD) and identify["user_id"] == "7"
        assert identify["token"] == client.creds.token and identify["session_id"] == client.creds.session_id
        states = [args[0] for args in client.recorder.of("state")]
        assert states[:3] == ["connecting", "identifying", "ready"]
        # secrets stay out of reprs
        for text in (repr(info), repr(client.gateway)):
            assert info.secret_key.hex() not in text and client.creds.token not in text
        # the engine's socket is kept alive by keepalives (not echoed, not needed)
        await server.wait_for(lambda: server.stats().get("keepalives", 0) >= 2, 5)
        await client.close()
        assert client.recorder.of("closed") == [(1000, None)]
        assert info.sock.fileno() == -1  # the gateway closed its socket after on_closed
        assert not server.violations()


@async_test
async def test_handshake_over_tls_with_the_bare_endpoint():
    async with LocalVoiceServer(tls=True, dave=False) as server:
        creds = server.create_session(GUILD, CHANNEL, 8)
        assert "://" not in creds.endpoint  # "host:port", as VOICE_SERVER_UPDATE sends it
        client = await connect(server, 8, creds=creds, endpoint=creds.endpoint, ssl=server.ssl_context(),
                               compress=15)
        assert client.gateway.url.startswith("wss://")
        assert client.recorder.session.ssrc == server.ssrc_of(8)
        await client.close()


@async_test
async def test_tls_with_an_untrusted_certificate_fails_without_looping(count_sockets):
    async with LocalVoiceServer(tls=True, dave=False) as server:
        client = start(server, 8, endpoint=server.endpoint, ssl=None, resume_attempts=2)  # system CAs only
        await asyncio.wait_for(client.task, 10)
        [(code, error)] = client.recorder.of("closed")
        assert code is None and isinstance(error, GatewayError) and "certificate" in str(error).lower()
        assert client.recorder.of("session") == []


@async_test
async def test_heartbeats_carry_seq_ack_and_measure_latency():
    async with LocalVoiceServer(dave=False) as server:
        client = await connect(server, 1, heartbeat_interval=0.03)
        other = await connect(server, 2, heartbeat_interval=0.03)
        await other.gateway.speaking(SpeakingFlags.MICROPHONE)
        await client.recorder.wait("speaking")  # seq moved on: Clients Connect, then Speaking
        # the last message the server sequenced for user 1 must be what the heartbeats acknowledge
        server_seq = server.session_of(1).seq
        assert client.gateway.last_seq == server_seq > 2
        await server.wait_for(
            lambda: [h for h in sent(server, 1, Opcode.HEARTBEAT) if h["d"]["seq_ack"] == server_seq], 5
        )
        acks = [h["d"]["seq_ack"] for h in sent(server, 1, Opcode.HEARTBEAT)]
        assert acks == sorted(acks) and acks[-1] == server_seq
        assert all(isinstance(h["d"]["t"], int) for h in sent(server, 1, Opcode.HEARTBEAT))
        assert client.gateway.latency is not None and client.gateway.latency > 0
        print(f"heartbeat RTT on loopback: {client.gateway.latency * 1e3:.2f} ms")
        await client.close()
        await other.close()


@async_test
async def test_speaking_and_events_from_others():
    async with LocalVoiceServer(dave=False) as server:
        a = await connect(server, 1)
        b = await connect(server, 2)
        await b.gateway.speaking(SpeakingFlags.MICROPHONE | SpeakingFlags.PRIORITY)
        await server.wait_for(lambda: sent(server, 2, Opcode.SPEAKING), 5)
        expected = {"speaking": 5, "delay": 0, "ssrc": server.ssrc_of(2)}
        assert sent(server, 2, Opcode.SPEAKING)[-1]["d"] == expected
        assert await a.recorder.wait("clients_connect") == ([2],)
        assert await a.recorder.wait("speaking") == (2, server.ssrc_of(2), 5)
        # unknown and legacy ops are ignored; the connection carries on
        server.session_of(1).send(99, {"whatever": True})
        server.session_of(1).send(Opcode.MEDIA_SINK_WANTS, {"any": 100})
        # DAVE ops are passed through as they are: JSON dicts, binary payloads without the prefix
        server.session_of(1).send(Opcode.DAVE_PREPARE_EPOCH, {"protocol_version": 1, "epoch": 1})
        server.session_of(1).send_binary(Opcode.DAVE_MLS_EXTERNAL_SENDER, b"\x01\x02external")
        await a.recorder.wait("dave_message", 2)
        assert a.recorder.of("dave_message") == [(24, {"protocol_version": 1, "epoch": 1}),
                                                 (25, b"\x01\x02external")]
        assert a.gateway.last_seq == server.session_of(1).seq  # the binary frame's prefix counts
        # client → server DAVE frames
        a.gateway.send_binary(Opcode.DAVE_MLS_KEY_PACKAGE, b"kp")
        a.gateway.send_json(Opcode.DAVE_TRANSITION_READY, {"transition_id": 3})
        await server.wait_for(lambda: sent(server, 1, Opcode.DAVE_TRANSITION_READY), 5)
        assert sent(server, 1, Opcode.DAVE_MLS_KEY_PACKAGE) == [{"op": 26, "binary": b"kp"}]
        await b.close()
        assert await a.recorder.wait("client_disconnect") == (2,)
        assert a.gateway.state == "ready"
        await a.close()


# -- resume and reconnect ---------------------------------------------------------------------------


@async_test
async def test_drop_resumes_with_seq_ack_and_replays_what_was_missed(count_sockets):
    async with LocalVoiceServer(dave=False) as server:
        client = await connect(server, 1)
        seen = client.gateway.last_seq
        ssrc = client.recorder.session.ssrc
        server.drop_client(1)  # TCP abort, no close frame
        # sent while the client is away: must be replayed after op 9
        server.session_of(1).send_binary(Opcode.DAVE_MLS_PROPOSALS, b"missed-proposal")
        server.session_of(1).send(Opcode.SPEAKING, {"user_id": "9", "ssrc": 99, "speaking": 1})
        await client.recorder.wait("resumed")
        await client.recorder.wait("speaking")
        [resume] = sent(server, 1, Opcode.RESUME)
        assert resume["d"]["seq_ack"] == seen
        assert resume["d"]["session_id"] == client.creds.session_id and resume["d"]["server_id"] == str(GUILD)
        assert client.recorder.names()[-3:] == ["resumed", "dave_message", "speaking"]
        assert client.recorder.of("dave_message") == [(27, b"missed-proposal")]
        assert client.recorder.of("speaking") == [(9, 99, 1)]
        assert len(client.recorder.of("session")) == 1  # no new UDP handshake
        assert server.ssrc_of(1) == ssrc == client.gateway.ssrc
        assert len(count_sockets) == 2
        # the resumed socket works: speaking goes out with the same SSRC
        await client.gateway.speaking(1)
        await server.wait_for(lambda: sent(server, 1, Opcode.SPEAKING), 5)
        assert sent(server, 1, Opcode.SPEAKING)[-1]["d"]["ssrc"] == ssrc
        await client.close()


@async_test
async def test_missing_heartbeat_acks_mean_a_dead_socket_and_a_resume():
    async with LocalVoiceServer(dave=False) as server:
        client = await connect(server, 1, heartbeat_interval=0.03, max_missed_heartbeat_acks=3)
        beats_before = len(sent(server, 1, Opcode.HEARTBEAT))
        client.recorder.when_resuming = lambda: setattr(server.faults, "drop_heartbeat_acks", False)
        server.faults.drop_heartbeat_acks = True
        assert await client.recorder.wait("state", 4) == ("resuming", client.gateway.url)
        await client.recorder.wait("resumed")
        unacked = len(sent(server, 1, Opcode.HEARTBEAT)[beats_before:])
        assert unacked >= 3  # it waited for three missing ACKs before giving the socket up
        assert len(sent(server, 1, Opcode.RESUME)) == 1
        assert len(client.recorder.of("session")) == 1
        assert server.ssrc_of(1) == client.recorder.session.ssrc
        await client.close()


@async_test
async def test_voice_server_crash_4015_resumes(count_sockets):
    async with LocalVoiceServer(dave=False) as server:
        client = await connect(server, 1)
        server.close_client(1, 4015)
        await client.recorder.wait("resumed")
        assert len(count_sockets) == 2 and len(client.recorder.of("session")) == 1
        await client.close()


@async_test
async def test_refused_resume_falls_back_to_a_full_reconnect(count_sockets):
    # A tiny replay buffer: after a drop with more missed messages than it holds, the server refuses
    # the resume with 4006; the client identifies afresh and gets a new UDP session.
    async with LocalVoiceServer(dave=False, resume_buffer=2) as server:
        client = await connect(server, 1)
        first = client.recorder.session
        server.drop_client(1)
        for n in range(4):
            server.session_of(1).send(Opcode.SPEAKING, {"user_id": "9", "ssrc": 99, "speaking": n})
        second = (await client.recorder.wait("session", 2))[0]
        assert second.ssrc == server.ssrc_of(1) != first.ssrc
        # the old socket is closed once on_session has handed over the new one
        assert second.sock is not first.sock and first.sock.fileno() == -1
        # the refused op 7 is not in the user's log (the server never attributed that socket), so: sockets
        assert len(count_sockets) == 3 and len(sent(server, 1, Opcode.IDENTIFY)) == 2
        states = [args[0] for args in client.recorder.of("state")]
        assert states[3:] == ["resuming", "connecting", "identifying", "ready"]
        assert client.recorder.of("resumed") == []
        assert client.gateway.ssrc == second.ssrc
        await client.close()
        assert second.sock.fileno() == -1


@async_test
async def test_server_gone_gives_up_after_the_configured_attempts():
    server = LocalVoiceServer(dave=False)
    await server.start()
    client = await connect(server, 1, resume_attempts=2, backoff_base=0.01, backoff_max=0.05)
    await server.stop()  # every later connect is refused
    await asyncio.wait_for(client.task, 10)
    [(code, error)] = client.recorder.of("closed")
    assert isinstance(error, GatewayError) and "could not connect" in str(error)
    states = [args[0] for args in client.recorder.of("state")]
    assert states.count("resuming") == 2 and states.count("connecting") == 1 + 2  # first + 2 fresh tries
    assert states[-1] == "closed"


# -- terminal close codes ---------------------------------------------------------------------------


@async_test
async def test_wrong_token_is_4004_and_no_reconnect_loop(count_sockets):
    async with LocalVoiceServer(dave=False) as server:
        client = start(server, 1, token="not-the-token")
        await asyncio.wait_for(client.task, 10)
        [(code, error)] = client.recorder.of("closed")
        assert code == 4004 and isinstance(error, GatewayError) and error.code == 4004
        assert "4004" in str(error) and "authentication failed" in str(error)
        assert "not-the-token" not in str(error)
        assert len(count_sockets) == 1
        assert client.recorder.of("session") == []


@async_test
async def test_dave_channel_without_dave_is_4017_with_a_clear_error(count_sockets, caplog):
    async with LocalVoiceServer(dave=True) as server:
        with caplog.at_level(logging.DEBUG, logger="telecom"):
            client = start(server, 1, max_dave_protocol_version=0)
            await asyncio.wait_for(client.task, 10)
        [(code, error)] = client.recorder.of("closed")
        assert code == 4017 and error.code == 4017 and "DAVE protocol required" in str(error)
        assert len(count_sockets) == 1
        assert client.creds.token not in caplog.text  # tokens never reach the logs


@async_test
async def test_4014_disconnected_is_terminal(count_sockets):
    async with LocalVoiceServer(dave=False) as server:
        client = await connect(server, 1)
        sock = client.recorder.session.sock
        server.close_client(1, 4014)
        await asyncio.wait_for(client.task, 10)
        [(code, error)] = client.recorder.of("closed")
        assert code == 4014 and error.code == 4014 and "disconnected" in str(error)
        assert len(count_sockets) == 1 and client.gateway.state == "closed"
        assert sock.fileno() == -1
        with pytest.raises(Exception):
            client.gateway.send_speaking(1)


@async_test
async def test_close_while_connecting_stops_promptly():
    client = start(_Unreachable(), 1, connect_timeout=30.0)
    await asyncio.sleep(0.05)
    await asyncio.wait_for(client.gateway.close(), 5)
    assert client.task.done()
    [(code, error)] = client.recorder.of("closed")
    assert (code, error) == (1000, None)


class _Unreachable:
    """Stands in for a server whose address swallows SYNs (TEST-NET-1 never answers)."""

    url = "ws://192.0.2.1:9/"

    def create_session(self, guild_id, channel_id, user_id):
        from telecom.testing import VoiceCredentials

        return VoiceCredentials(endpoint="192.0.2.1:9", token="t", session_id="s", guild_id=guild_id,
                                channel_id=channel_id, user_id=user_id)


@async_test
async def test_handshake_step_timeout_is_a_connect_timeout():
    # A websocket server that accepts and then says nothing: Ready never comes.
    from aiohttp import web

    async def silent(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws

    app = web.Application()
    app.router.add_get("/", silent)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        recorder = Recorder()
        gateway = VoiceGateway(endpoint=f"ws://127.0.0.1:{port}", server_id=1, user_id=2, session_id="s",
                               token="t", listener=recorder,
                               config=GatewayConfig(connect_timeout=0.1, resume_attempts=2,
                                                    backoff_base=0.01))
        await asyncio.wait_for(gateway.run(), 10)
        [(code, error)] = recorder.of("closed")
        assert isinstance(error, ConnectTimeout) and "Ready" in str(error)
    finally:
        await runner.cleanup()


@async_test
async def test_no_common_encryption_mode_is_terminal(count_sockets):
    async with LocalVoiceServer(dave=False, modes=()) as server:
        client = start(server, 1)
        await asyncio.wait_for(client.task, 10)
        [(code, error)] = client.recorder.of("closed")
        assert isinstance(error, GatewayError) and "encryption mode" in str(error)
        assert len(count_sockets) == 1 and client.recorder.of("session") == []


def test_a_failing_listener_reaches_the_loop_handler_and_the_gateway_carries_on():
    problems = []

    class Grumpy(Recorder):
        def on_clients_connect(self, user_ids):
            raise RuntimeError("listener bug")

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: problems.append(context))
        async with LocalVoiceServer(dave=False) as server:
            a = start(server, 1, recorder=Grumpy())
            await a.recorder.wait("session")
            b = await connect(server, 2)
            await b.gateway.speaking(1)
            assert await a.recorder.wait("speaking") == (2, server.ssrc_of(2), 1)
            await b.close()
            await a.close()

    asyncio.run(main())
    assert [type(p["exception"]) for p in problems] == [RuntimeError]
    assert "on_clients_connect" in problems[0]["message"]
