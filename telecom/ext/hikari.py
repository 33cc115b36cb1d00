"""hikari adapter: ``await bot.voice.connect_to(guild, channel, TelecomVoiceConnection)`` gives a telecom
voice connection.

What it owns: a :class:`hikari.api.VoiceConnection` backed by one :class:`telecom.Client` — created in
``initialize`` from the session id / endpoint / token hikari's ``VoiceComponent`` gathered, then fed the
voice events hikari routes to ``notify``: a VOICE_SERVER_UPDATE (move, or ``endpoint is None``: the
server is being reallocated) → ``set_server_info``; our own VOICE_STATE_UPDATE (new session id, new
channel, or no channel: we were removed → close). A dead voice session (close 4006/4009/4004) is
re-joined through hikari's shard (op 4 leave + join). ``disconnect()`` closes the client and lets
hikari's component unregister us and leave the channel.

What it must not do: touch audio, or hikari's own state beyond the documented hooks.

Example::

    from telecom import Playable
    from telecom.ext.hikari import TelecomVoiceConnection

    voice = await bot.voice.connect_to(guild_id, channel_id, TelecomVoiceConnection)
    pipe = voice.play(Playable.from_pcm_pipe())     # voice.telecom is the telecom.Client
    pipe.send(pcm)
    await voice.disconnect()

Extra keyword arguments of ``connect_to`` reach ``initialize``: ``ssl`` (a CA file or SSLContext),
``ready_timeout`` (seconds, default 10) and any :class:`telecom.Client` option (``bitrate``, ...).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

import hikari
from hikari.api import voice as voice_api
from hikari.events import voice_events

from telecom.client import Client
from telecom.errors import ConnectTimeout
from telecom.ext import wait_ready
from telecom.playable import Playable
from telecom.protocol import CLOSE_ACTIONS

log = logging.getLogger("telecom.ext.hikari")


class TelecomVoiceConnection(voice_api.VoiceConnection):
    """A hikari voice connection whose audio is telecom's (``self.telecom``)."""

    def __init__(self, *, client: Client, channel_id: hikari.Snowflake, guild_id: hikari.Snowflake,
                 on_close: Callable[[Any], Awaitable[None]], owner: voice_api.VoiceComponent,
                 session_id: str, shard_id: int, user_id: hikari.Snowflake) -> None:
        self.telecom = client
        self._channel_id = channel_id
        self._guild_id = guild_id
        self._on_close = on_close
        self._owner = owner
        self._session_id = session_id
        self._shard_id = shard_id
        self._user_id = user_id
        self._loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        self._rejoining = False
        # During a re-join, a server update waits for the state update with the new session.
        self._pending_server: tuple[str, str | None] | None = None
        client.on("disconnect", self._on_telecom_disconnect)

    @classmethod
    async def initialize(cls, channel_id: hikari.Snowflake, endpoint: str, guild_id: hikari.Snowflake,
                         on_close: Callable[[Any], Awaitable[None]], owner: voice_api.VoiceComponent,
                         session_id: str, shard_id: int, token: str, user_id: hikari.Snowflake,
                         **kwargs: Any) -> "TelecomVoiceConnection":
        ready_timeout = float(kwargs.pop("ready_timeout", 10.0))
        client = Client(int(user_id), int(guild_id), session_id, channel_id=int(channel_id), **kwargs)
        connection = cls(client=client, channel_id=channel_id, guild_id=guild_id, on_close=on_close,
                         owner=owner, session_id=session_id, shard_id=shard_id, user_id=user_id)
        # hikari gives "wss://host:port" (scheme added, port sanitised): telecom takes it as is.
        client.set_server_info(endpoint, token)
        try:
            await wait_ready(client, ready_timeout)
        except BaseException:
            client.close()
            raise
        return connection

    # -- the VoiceConnection interface -------------------------------------------------------------
    @property
    def channel_id(self) -> hikari.Snowflake:
        return self._channel_id

    @property
    def guild_id(self) -> hikari.Snowflake:
        return self._guild_id

    @property
    def is_alive(self) -> bool:
        return not self._closed.is_set()

    @property
    def shard_id(self) -> int:
        return self._shard_id

    @property
    def owner(self) -> voice_api.VoiceComponent:
        return self._owner

    async def disconnect(self) -> None:
        """Close the telecom client; hikari's component then unregisters us and sends op 4 (leave)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self.telecom.close()
        await self._on_close(self)

    async def join(self) -> None:
        """Wait until the connection has been closed."""
        await self._closed.wait()

    async def notify(self, event: voice_events.VoiceEvent) -> None:
        if isinstance(event, voice_events.VoiceServerUpdateEvent):
            if event.guild_id != self._guild_id:
                return
            if event.endpoint is None:
                log.info("voice server for guild %s is being reallocated", self._guild_id)
                self.telecom.set_server_info(None, None)
                return
            if self._rejoining:
                self._pending_server = (event.endpoint, event.token)
                return
            self.telecom.set_server_info(event.endpoint, event.token, channel_id=int(self._channel_id))
        elif isinstance(event, voice_events.VoiceStateUpdateEvent):
            state = event.state
            if state.guild_id != self._guild_id or state.user_id != self._user_id:
                return
            if state.channel_id is None:
                if not self._rejoining:
                    log.info("voice state for guild %s: no channel any more; closing", self._guild_id)
                    await self.disconnect()
                return
            self._channel_id = state.channel_id
            if state.session_id != self._session_id:
                # A new main-gateway session: the next server update identifies with it.
                self._session_id = state.session_id
                self.telecom.session_id = state.session_id
            if self._rejoining:
                self._rejoining = False
                pending, self._pending_server = self._pending_server, None
                if pending is not None:
                    self.telecom.set_server_info(pending[0], pending[1], channel_id=int(self._channel_id))

    # -- telecom's side (its io thread) -----------------------------------------------------------
    def _on_telecom_disconnect(self, event: Any) -> None:
        code = event.data.get("code")
        if code is not None and CLOSE_ACTIONS.get(code) == "new_session" and not self._closed.is_set():
            log.warning("voice session for guild %s is no longer valid (close %s): re-joining through "
                        "hikari's shard", self._guild_id, code)
            asyncio.run_coroutine_threadsafe(self._rejoin(), self._loop)

    async def _rejoin(self) -> None:
        shard = self._owner._app.shards[self._shard_id]  # type: ignore[attr-defined]
        self._rejoining = True
        self._pending_server = None
        await shard.update_voice_state(self._guild_id, None)
        await shard.update_voice_state(self._guild_id, self._channel_id)

    # -- conveniences ---------------------------------------------------------------------------
    def play(self, playable: Playable) -> Playable:
        """``self.telecom.play(playable)``."""
        return self.telecom.play(playable)

    async def wait_ready(self, timeout: float = 10.0) -> None:
        try:
            await wait_ready(self.telecom, timeout)
        except ConnectTimeout as exc:
            raise hikari.errors.VoiceError(str(exc)) from exc
