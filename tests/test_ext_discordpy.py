"""The discord.py adapter, driven through discord.py's own code: ``channel.connect(cls=TelecomVoice)`` on a
real ``discord.Client`` whose main-gateway websocket is replaced by a stand-in for Discord that answers op 4
by feeding VOICE_STATE_UPDATE / VOICE_SERVER_UPDATE payloads (the shapes Discord sends) to discord.py's
parsers. Audio is checked at the local voice server with its own decoder."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from audio_checks import active_part, left_channel, peak_frequency, rms_db, stereo_tone
from conftest import new_ids
from telecom import Playable
from telecom.testing import LocalVoiceServer

discord = pytest.importorskip("discord",
                              reason="discord.py is not installed (pip install 'telecom[discordpy]')")

from telecom.ext.discordpy import TelecomVoice  # noqa: E402


class FakeDiscordGateway:
    """What Discord's main gateway does when a bot sends op 4, fed to discord.py's parse_* handlers."""

    def __init__(self, state, servers: dict[str, LocalVoiceServer], user_id: int) -> None:
        self.state = state
        self.servers = servers
        self.region = "first"
        self.user_id = user_id
        self.sent: list[tuple] = []
        self.session_id: str | None = None
        self.server_first = True
        self.reallocate = False
        self.state_delay = 0.0  # seconds between the first and the second update

    def voice_state_payload(self, guild_id: int, channel_id: int | None) -> dict:
        return {
            "guild_id": str(guild_id), "channel_id": None if channel_id is None else str(channel_id),
            "user_id": str(self.user_id), "session_id": self.session_id, "deaf": False, "mute": False,
            "self_deaf": False, "self_mute": False, "self_video": False, "suppress": False,
            "request_to_speak_timestamp": None,
            "member": {"user": {"id": str(self.user_id), "username": "bot", "discriminator": "0",
                                "avatar": None, "global_name": None},
                       "roles": [], "joined_at": "2026-01-01T00:00:00+00:00", "deaf": False, "mute": False},
        }

    async def voice_state(self, guild_id, channel_id, self_mute=False, self_deaf=False):
        self.sent.append((guild_id, channel_id, self_mute, self_deaf))
        loop = asyncio.get_running_loop()
        if channel_id is None:
            loop.call_soon(self.state.parse_voice_state_update, self.voice_state_payload(guild_id, None))
            return
        self.join(guild_id, channel_id, reallocate=self.reallocate)

    def join(self, guild_id: int, channel_id: int, *, reallocate: bool = False) -> None:
        """A (new) session on the current region's server: the two updates, in either order."""
        server = self.servers[self.region]
        creds = server.create_session(guild_id, channel_id, self.user_id)
        self.session_id = creds.session_id
        loop = asyncio.get_running_loop()
        state_update = (self.state.parse_voice_state_update, self.voice_state_payload(guild_id, channel_id))
        server_update = (self.state.parse_voice_server_update,
                         {"token": creds.token, "guild_id": str(guild_id), "endpoint": server.endpoint})
        order = [server_update, state_update] if self.server_first else [state_update, server_update]
        if reallocate:  # Discord first says "no server" while it moves the call
            loop.call_soon(self.state.parse_voice_server_update,
                           {"token": None, "guild_id": str(guild_id), "endpoint": None})
        loop.call_soon(order[0][0], order[0][1])
        loop.call_later(self.state_delay, order[1][0], order[1][1])


def make_discord_client(guild_id: int, channel_ids: list[int], user_id: int):
    client = discord.Client(intents=discord.Intents.default())
    state = client._connection
    state.user = discord.ClientUser(state=state, data={
        "id": str(user_id), "username": "bot", "discriminator": "0", "avatar": None, "global_name": None})
    channels = [{"id": str(c), "type": 2, "name": f"voice-{c}", "position": i, "guild_id": str(guild_id),
                 "bitrate": 64000, "user_limit": 0, "permission_overwrites": []}
                for i, c in enumerate(channel_ids)]
    guild = discord.Guild(data={"id": str(guild_id), "name": "guild", "channels": channels, "roles": [],
                                "members": [], "voice_states": []}, state=state)
    state._add_guild(guild)
    return client, state, guild


def tls_server() -> LocalVoiceServer:
    server = LocalVoiceServer(dave=False, tls=True, heartbeat_interval=1.0)
    server.start_background()
    return server


async def play_tone(voice: TelecomVoice, freq: float, seconds: float = 1.0) -> None:
    pipe = Playable.from_pcm_pipe()
    pipe.send(stereo_tone(seconds, freq))
    pipe.close()
    voice.play(pipe)
    await asyncio.wrap_future(pipe.done)


def check_tone(pcm: bytes, freq: float) -> None:
    audio = active_part(left_channel(pcm))
    assert len(audio) > 24000
    assert peak_frequency(audio) == pytest.approx(freq, abs=2.0)
    assert rms_db(audio) == pytest.approx(-9.0, abs=1.0)


@pytest.fixture
def servers():
    made = {"first": tls_server(), "second": tls_server()}
    yield made
    for server in made.values():
        server.stop_background()


def trust_both(servers) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=servers["first"].ca_file)
    context.load_verify_locations(servers["second"].ca_file)
    return context


def test_connect_plays_follows_a_move_and_disconnects(servers):
    guild_id, channel_id, user_id = new_ids()

    async def scenario():
        client, state, guild = make_discord_client(guild_id, [channel_id, channel_id + 5], user_id)
        fake = FakeDiscordGateway(state, servers, user_id)
        state._get_websocket = lambda guild_id=None, shard_id=None: fake
        channel = guild.get_channel(channel_id)

        voice = await channel.connect(cls=TelecomVoice.with_options(ssl=trust_both(servers)), timeout=10)
        assert isinstance(voice, TelecomVoice) and voice.is_connected()
        assert state._get_voice_client(guild_id) is voice  # discord.py tracks it as the guild's voice client
        assert fake.sent == [(guild_id, channel_id, False, False)]
        assert voice.telecom.session_id == fake.session_id and voice.telecom.channel_id == channel_id
        await play_tone(voice, 440.0)
        await asyncio.to_thread(servers["first"].wait_for_sync,
                                lambda: servers["first"].record(user_id).speaking_events[-1][1] == 0, 5)

        # A move to another channel on another voice server (with a reallocation notice first), the
        # updates in the other order this time: telecom follows with set_server_info.
        fake.region, fake.server_first, fake.reallocate = "second", False, True
        moved = asyncio.Event()
        loop = asyncio.get_running_loop()
        voice.telecom.on("ready", lambda event: loop.call_soon_threadsafe(moved.set))
        states = []
        voice.telecom.on("state", lambda event: states.append(event.state))
        await voice.move_to(guild.get_channel(channel_id + 5))
        await asyncio.wait_for(moved.wait(), 10)
        assert "waiting_for_server" in states  # the reallocation notice was followed
        assert voice.channel.id == channel_id + 5 and voice.telecom.channel_id == channel_id + 5
        assert voice.telecom.stats()["state"] == "ready"
        await play_tone(voice, 660.0)
        await asyncio.to_thread(servers["second"].wait_for_sync,
                                lambda: servers["second"].record(user_id).speaking_events[-1][1] == 0, 5)

        telecom_client = voice.telecom
        await voice.disconnect()
        assert fake.sent[-1] == (guild_id, None, False, False)
        assert telecom_client.state == "closed" or telecom_client._closed
        assert state._get_voice_client(guild_id) is None
        await client.close()

    asyncio.run(scenario())
    check_tone(servers["first"].record(user_id).pcm(), 440.0)
    check_tone(servers["second"].record(user_id).pcm(), 660.0)
    assert servers["first"].violations(user_id) == []
    assert servers["second"].violations(user_id) == [], _packet_trace(servers["second"].record(user_id))


def _packet_trace(record) -> str:
    """(ms since the first packet, sequence, timestamp, silence) of the packets, for a failure message."""
    t0 = record.packets[0].arrival if record.packets else 0.0
    rows = [(round((p.arrival - t0) * 1000), p.sequence, p.timestamp, p.is_silence) for p in record.packets]
    return f"packets {rows}; speaking {record.speaking_events}"


def test_session_no_longer_valid_rejoins_through_discord_gateway(servers):
    guild_id, channel_id, user_id = new_ids()
    server = servers["first"]

    async def scenario():
        client, state, guild = make_discord_client(guild_id, [channel_id], user_id)
        fake = FakeDiscordGateway(state, servers, user_id)
        state._get_websocket = lambda guild_id=None, shard_id=None: fake
        voice = await guild.get_channel(channel_id).connect(
            cls=TelecomVoice.with_options(ssl=server.ca_file), timeout=10)
        first_session = voice.telecom.session_id
        ready_again = asyncio.Event()
        loop = asyncio.get_running_loop()
        voice.telecom.on("ready", lambda event: loop.call_soon_threadsafe(ready_again.set))

        # The new server update comes well before the state update with the new session: telecom must
        # not identify with the old session in between.
        fake.state_delay = 0.3
        server.close_client(user_id, 4006, "session no longer valid")
        await asyncio.wait_for(ready_again.wait(), 10)
        # Left and joined again through discord.py's gateway, and identified with the new session.
        assert fake.sent == [(guild_id, channel_id, False, False), (guild_id, None, False, False),
                             (guild_id, channel_id, False, False)]
        assert voice.telecom.session_id == fake.session_id != first_session
        assert state._get_voice_client(guild_id) is voice
        await play_tone(voice, 523.0)
        await asyncio.to_thread(server.wait_for_sync,
                                lambda: server.record(user_id).speaking_events[-1][1] == 0, 5)
        await voice.disconnect()
        await client.close()

    asyncio.run(scenario())
    check_tone(server.record(user_id).pcm(), 523.0)


def test_connect_times_out_when_discord_never_answers():
    guild_id, channel_id, user_id = new_ids()

    class Silent:
        sent: list = []

        async def voice_state(self, *args):
            self.sent.append(args)

    async def scenario():
        client, state, guild = make_discord_client(guild_id, [channel_id], user_id)
        silent = Silent()
        state._get_websocket = lambda guild_id=None, shard_id=None: silent
        with pytest.raises(asyncio.TimeoutError, match="VOICE_STATE_UPDATE"):
            await guild.get_channel(channel_id).connect(cls=TelecomVoice, timeout=0.3)
        # discord.py called disconnect(force=True): op 4 leave, and the voice client is forgotten.
        assert silent.sent[-1] == (guild_id, None, False, False)
        assert state._get_voice_client(guild_id) is None
        await client.close()

    asyncio.run(scenario())


def test_removed_from_the_channel_closes_the_connection(servers):
    """A VOICE_STATE_UPDATE without a channel that we did not ask for (kicked, channel deleted)."""
    guild_id, channel_id, user_id = new_ids()

    async def scenario():
        client, state, guild = make_discord_client(guild_id, [channel_id], user_id)
        fake = FakeDiscordGateway(state, servers, user_id)
        state._get_websocket = lambda guild_id=None, shard_id=None: fake
        voice = await guild.get_channel(channel_id).connect(
            cls=TelecomVoice.with_options(ssl=servers["first"].ca_file), timeout=10)
        closed = asyncio.Event()
        loop = asyncio.get_running_loop()
        voice.telecom.on("closed", lambda event: loop.call_soon_threadsafe(closed.set))
        state.parse_voice_state_update(fake.voice_state_payload(guild_id, None))
        await asyncio.wait_for(closed.wait(), 5)
        assert state._get_voice_client(guild_id) is None and not voice.is_connected()
        assert fake.sent == [(guild_id, channel_id, False, False)]  # nothing sent: Discord removed us
        await client.close()

    asyncio.run(scenario())
