"""The hikari adapter, driven through hikari's own code: ``bot.voice.connect_to(..., TelecomVoiceConnection)``
on a real ``hikari.GatewayBot`` whose shard is a stand-in for Discord's main gateway: it answers op 4 by
feeding raw VOICE_STATE_UPDATE / VOICE_SERVER_UPDATE payloads to hikari's event manager, as a shard
would. Audio is checked at the local voice server with its own decoder."""

from __future__ import annotations

import asyncio
import base64
import ssl

import pytest

from audio_checks import active_part, left_channel, peak_frequency, rms_db, stereo_tone
from conftest import new_ids
from telecom import ConnectTimeout, Playable
from telecom.testing import LocalVoiceServer

hikari = pytest.importorskip("hikari", reason="hikari is not installed (pip install 'telecom[hikari]')")

from telecom.ext.hikari import TelecomVoiceConnection  # noqa: E402


class FakeShard:
    """A shard whose gateway is Discord-as-the-local-voice-servers."""

    shard_count = 1
    id = 0

    def __init__(self, bot, servers: dict[str, LocalVoiceServer], user_id: int) -> None:
        self.bot = bot
        self.servers = servers
        self.region = "first"
        self.user_id = user_id
        self.sent: list[tuple] = []
        self.session_id: str | None = None
        self.reallocate = False
        self.server_first_by = 0.0  # > 0: the server update comes this many seconds before the state

    def state_payload(self, guild_id: int, channel_id: int | None) -> dict:
        return {
            "guild_id": str(guild_id), "channel_id": None if channel_id is None else str(channel_id),
            "user_id": str(self.user_id), "session_id": self.session_id, "deaf": False, "mute": False,
            "self_deaf": False, "self_mute": False, "self_video": False, "self_stream": False,
            "suppress": False, "request_to_speak_timestamp": None,
            "member": {"user": {"id": str(self.user_id), "username": "bot", "discriminator": "0",
                                "avatar": None, "global_name": None, "bot": True},
                       "roles": [], "joined_at": "2026-01-01T00:00:00+00:00", "deaf": False, "mute": False},
        }

    async def update_voice_state(self, guild, channel, *, self_mute=False, self_deaf=False):
        guild_id = int(guild)
        channel_id = None if channel is None else int(channel)
        self.sent.append((guild_id, channel_id))
        # Discord answers over the network, a little later (hikari starts waiting after sending op 4).
        loop = asyncio.get_running_loop()
        raw = self.bot.event_manager.consume_raw_event

        def consume(*args):
            loop.call_later(0.05, raw, *args)
        if channel_id is None:
            consume("VOICE_STATE_UPDATE", self, self.state_payload(guild_id, None))
            return
        server = self.servers[self.region]
        creds = server.create_session(guild_id, channel_id, self.user_id)
        self.session_id = creds.session_id
        if self.reallocate:
            consume("VOICE_SERVER_UPDATE", self,
                    {"token": None, "guild_id": str(guild_id), "endpoint": None})
        if self.server_first_by:
            loop.call_later(0.05 + self.server_first_by, raw, "VOICE_STATE_UPDATE", self,
                            self.state_payload(guild_id, channel_id))
        else:
            consume("VOICE_STATE_UPDATE", self, self.state_payload(guild_id, channel_id))
        consume("VOICE_SERVER_UPDATE", self,
                {"token": creds.token, "guild_id": str(guild_id), "endpoint": server.endpoint})


def make_bot(servers, user_id: int):
    token = base64.b64encode(str(user_id).encode()).decode().rstrip("=") + ".x.y"
    bot = hikari.GatewayBot(token, intents=hikari.Intents.ALL_UNPRIVILEGED, banner=None,
                            suppress_optimization_warning=True)
    me = bot.entity_factory.deserialize_my_user({"id": str(user_id), "username": "bot", "discriminator": "0",
                                                 "avatar": None, "global_name": None, "bot": True,
                                                 "mfa_enabled": True, "flags": 0})
    bot.cache.set_me(me)
    shard = FakeShard(bot, servers, user_id)
    bot._shards[0] = shard
    bot.voice.start()
    return bot, shard


@pytest.fixture
def servers():
    made = {}
    for name in ("first", "second"):
        made[name] = LocalVoiceServer(dave=False, tls=True, heartbeat_interval=1.0)
        made[name].start_background()
    yield made
    for server in made.values():
        server.stop_background()


async def play_tone(voice: TelecomVoiceConnection, freq: float) -> None:
    pipe = Playable.from_pcm_pipe()
    pipe.send(stereo_tone(1.0, freq))
    pipe.close()
    voice.play(pipe)
    await asyncio.wrap_future(pipe.done)


async def quiet(server, user_id) -> None:
    await asyncio.to_thread(server.wait_for_sync,
                            lambda: server.record(user_id).speaking_events[-1][1] == 0, 5)


def check_tone(pcm: bytes, freq: float) -> None:
    audio = active_part(left_channel(pcm))
    assert len(audio) > 24000
    assert peak_frequency(audio) == pytest.approx(freq, abs=2.0)
    assert rms_db(audio) == pytest.approx(-9.0, abs=1.0)


def test_connect_to_plays_follows_a_move_rejoins_and_disconnects(servers):
    guild_id, channel_id, user_id = new_ids()

    async def scenario():
        bot, shard = make_bot(servers, user_id)
        context = ssl.create_default_context(cafile=servers["first"].ca_file)
        context.load_verify_locations(servers["second"].ca_file)
        voice = await bot.voice.connect_to(guild_id, channel_id, TelecomVoiceConnection, ssl=context,
                                           timeout=10)
        assert isinstance(voice, TelecomVoiceConnection) and voice.is_alive
        assert bot.voice.connections[guild_id] is voice
        assert shard.sent == [(guild_id, channel_id)]
        assert voice.telecom.session_id == shard.session_id and voice.telecom.channel_id == channel_id
        await play_tone(voice, 440.0)
        await quiet(servers["first"], user_id)

        # Move to another voice server (a reallocation notice first): telecom follows.
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        voice.telecom.on("ready", lambda event: loop.call_soon_threadsafe(ready.set))
        shard.region, shard.reallocate = "second", True
        await shard.update_voice_state(guild_id, channel_id + 5)
        await asyncio.wait_for(ready.wait(), 10)
        assert voice.channel_id == channel_id + 5 and voice.telecom.channel_id == channel_id + 5
        await play_tone(voice, 660.0)
        await quiet(servers["second"], user_id)

        # The voice session dies (4006): re-joined through the shard with a new session.
        ready.clear()
        shard.reallocate, shard.server_first_by = False, 0.3  # the new session's state comes late
        old_session = voice.telecom.session_id
        servers["second"].close_client(user_id, 4006, "session no longer valid")
        await asyncio.wait_for(ready.wait(), 10)
        assert shard.sent[-2:] == [(guild_id, None), (guild_id, channel_id + 5)]
        assert voice.telecom.session_id == shard.session_id != old_session
        assert voice.is_alive and bot.voice.connections[guild_id] is voice

        client = voice.telecom
        await voice.disconnect()
        await asyncio.wait_for(voice.join(), 1)
        assert not voice.is_alive and guild_id not in bot.voice.connections
        assert shard.sent[-1] == (guild_id, None)  # hikari's component left the channel for us
        assert client._closed

    asyncio.run(scenario())
    check_tone(servers["first"].record(user_id).pcm(), 440.0)
    assert servers["first"].violations(user_id) == []
    pcm_second = servers["second"].record(user_id).pcm()
    check_tone(pcm_second, 660.0)


def test_a_refused_connection_leaves_the_channel(servers):
    guild_id, channel_id, user_id = new_ids()

    async def scenario():
        bot, shard = make_bot(servers, user_id)
        # No CA given: the local server's certificate is not trusted, so telecom never becomes ready
        # (it keeps retrying); initialize gives up after ready_timeout and hikari leaves the channel.
        with pytest.raises(ConnectTimeout, match="not ready within 1.5 s"):
            await bot.voice.connect_to(guild_id, channel_id, TelecomVoiceConnection, ready_timeout=1.5,
                                       timeout=10)
        assert shard.sent == [(guild_id, channel_id), (guild_id, None)]
        assert guild_id not in bot.voice.connections

    asyncio.run(scenario())


def test_removed_from_the_channel_closes_the_connection(servers):
    """A VOICE_STATE_UPDATE without a channel that we did not ask for (kicked, channel deleted)."""
    guild_id, channel_id, user_id = new_ids()

    async def scenario():
        bot, shard = make_bot(servers, user_id)
        voice = await bot.voice.connect_to(guild_id, channel_id, TelecomVoiceConnection,
                                           ssl=servers["first"].ca_file, timeout=10)
        client = voice.telecom
        bot.event_manager.consume_raw_event("VOICE_STATE_UPDATE", shard, shard.state_payload(guild_id, None))
        await asyncio.wait_for(voice.join(), 5)
        assert not voice.is_alive and guild_id not in bot.voice.connections
        assert client._closed

    asyncio.run(scenario())
