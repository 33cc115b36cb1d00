"""discord.py adapter: ``await channel.connect(cls=TelecomVoice)`` gives a telecom voice connection.

What it owns: the glue between discord.py's main gateway and one :class:`telecom.Client` per voice
connection — sending op 4 (voice state) through discord.py (``guild.change_voice_state``), turning
VOICE_STATE_UPDATE / VOICE_SERVER_UPDATE into ``Client`` calls (session id, channel id, endpoint,
token; an endpoint of ``None`` means the voice server is being reallocated), following moves (a new
server update → ``set_server_info``), re-joining through discord.py's gateway when the voice session
is dead (close 4006/4009/4004: op 4 leave + join gives a new session), and leaving.

What it must not do: touch audio (that is telecom's engine) or discord.py's own voice client; it never
imports PyNaCl/opus through discord.py.

Example::

    import discord
    from telecom import Playable
    from telecom.ext.discordpy import TelecomVoice

    voice = await channel.connect(cls=TelecomVoice)      # waits until telecom can send audio
    pipe = voice.play(Playable.from_pcm_pipe())          # voice.telecom is the telecom.Client
    pipe.send(pcm)
    await voice.disconnect()
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import discord

from telecom.client import Client
from telecom.errors import ConnectTimeout
from telecom.ext import wait_ready
from telecom.playable import Playable
from telecom.protocol import CLOSE_ACTIONS

log = logging.getLogger("telecom.ext.discordpy")


class TelecomVoice(discord.VoiceProtocol):
    """A :class:`discord.VoiceProtocol` backed by a :class:`telecom.Client` (``self.telecom``).

    Options for the telecom client (``bitrate``, ``complexity``, ``ssl``, ...) are given with
    :meth:`with_options`, because discord.py constructs the class itself:
    ``await channel.connect(cls=TelecomVoice.with_options(bitrate=96000))``.
    """

    client_options: dict[str, Any] = {}

    @classmethod
    def with_options(cls, **options: Any) -> type["TelecomVoice"]:
        """A subclass whose telecom clients are created with ``Client(..., **options)``."""
        return type(cls.__name__, (cls,), {"client_options": {**cls.client_options, **options}})

    def __init__(self, client: discord.Client, channel: Any) -> None:
        super().__init__(client, channel)
        self.guild = channel.guild
        self.telecom: Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session_id: str | None = None
        self._channel_id: int | None = channel.id
        self._server: tuple[str | None, str | None] | None = None  # (endpoint, token) waiting for a session
        self._have_state = asyncio.Event()
        self._have_server = asyncio.Event()
        self._rejoining = False
        # After our own op 4 join, a server update waits for the state update that carries the
        # session it belongs to (Discord sends the two in either order).
        self._wait_for_state = True
        self._closed = False
        self._self_mute = False
        self._self_deaf = False

    # -- discord.py's side ------------------------------------------------------------------------
    async def connect(self, *, timeout: float, reconnect: bool, self_deaf: bool = False,
                      self_mute: bool = False) -> None:
        """Send op 4 through discord.py's gateway, then wait for both updates and telecom's ready."""
        self._loop = asyncio.get_running_loop()
        self._self_mute, self._self_deaf = self_mute, self_deaf
        await self.guild.change_voice_state(channel=self.channel, self_mute=self_mute, self_deaf=self_deaf)
        deadline = self._loop.time() + timeout
        try:
            await asyncio.wait_for(asyncio.gather(self._have_state.wait(), self._have_server.wait()), timeout)
        except asyncio.TimeoutError:
            raise asyncio.TimeoutError(
                f"no VOICE_STATE_UPDATE/VOICE_SERVER_UPDATE for guild {self.guild.id} within {timeout} s"
            ) from None
        assert self.telecom is not None
        try:
            await wait_ready(self.telecom, max(0.1, deadline - self._loop.time()))
        except ConnectTimeout as exc:
            raise asyncio.TimeoutError(str(exc)) from exc

    async def on_voice_state_update(self, data: dict, /) -> None:
        """VOICE_STATE_UPDATE for our own user: session id and channel (None: we left / were removed)."""
        channel_id = data.get("channel_id")
        if channel_id is None:
            if self._rejoining:
                return  # our own leave during a re-join; the join follows
            log.info("voice state for guild %s: no channel any more; closing", self.guild.id)
            self._close()
            return
        self._channel_id = int(channel_id)
        channel = self.guild.get_channel(self._channel_id)
        if channel is not None:
            self.channel = channel
        session_id = data["session_id"]
        if self.telecom is None:
            self.telecom = Client(self.client.user.id, self.guild.id, session_id, channel_id=self._channel_id,
                                  **self.client_options)
            self.telecom.on("disconnect", self._on_telecom_disconnect)
        elif session_id != self._session_id:
            # A new main-gateway session (re-join or resumed main gateway): the next server update
            # identifies with it; the playables stay attached to the client.
            self.telecom.session_id = session_id
        self._session_id = session_id
        self._wait_for_state = False
        self._have_state.set()
        if self._server is not None:
            endpoint, token = self._server
            self._server = None
            self._apply_server(endpoint, token)

    async def on_voice_server_update(self, data: dict, /) -> None:
        """VOICE_SERVER_UPDATE: endpoint + token (endpoint None: the voice server is being reallocated)."""
        endpoint, token = data.get("endpoint"), data.get("token")
        if self.telecom is None or self._wait_for_state:
            self._server = (endpoint, token)  # applied with the state update that follows
            if endpoint is not None:
                self._have_server.set()
            return
        self._apply_server(endpoint, token)

    def _apply_server(self, endpoint: str | None, token: str | None) -> None:
        assert self.telecom is not None
        if endpoint is None:
            log.info("voice server for guild %s is being reallocated", self.guild.id)
            self.telecom.set_server_info(None, None)
            return
        self._rejoining = False
        self.telecom.set_server_info(endpoint, token, channel_id=self._channel_id)
        self._have_server.set()

    async def disconnect(self, *, force: bool = False) -> None:
        """Leave the channel (op 4 with no channel) and close the telecom client."""
        if self._closed and not force:
            return
        try:
            await self.guild.change_voice_state(channel=None)
        finally:
            self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.telecom is not None:
            self.telecom.close()
        try:
            self.cleanup()
        except Exception:  # noqa: BLE001 - already removed from discord.py's cache
            log.debug("cleanup failed", exc_info=True)

    # -- telecom's side (events arrive on telecom's io thread) ---------------------------------------
    def _on_telecom_disconnect(self, event: Any) -> None:
        code = event.data.get("code")
        action = CLOSE_ACTIONS.get(code) if code is not None else None
        if action == "new_session" and self._loop is not None and not self._closed:
            log.warning("voice session for guild %s is no longer valid (close %s): re-joining through the "
                        "main gateway", self.guild.id, code)
            asyncio.run_coroutine_threadsafe(self._rejoin(), self._loop)

    async def _rejoin(self) -> None:
        """Leave and join again through discord.py: Discord answers with a new session and server."""
        self._rejoining = True
        self._wait_for_state = True
        self._server = None
        self._have_server.clear()
        await self.guild.change_voice_state(channel=None)
        await self.guild.change_voice_state(channel=self.channel, self_mute=self._self_mute,
                                            self_deaf=self._self_deaf)

    # -- conveniences -------------------------------------------------------------------------------
    def play(self, playable: Playable) -> Playable:
        """``self.telecom.play(playable)``."""
        if self.telecom is None:
            raise discord.ClientException("not connected to voice")
        return self.telecom.play(playable)

    def is_connected(self) -> bool:
        return self.telecom is not None and self.telecom.state == "ready"

    async def move_to(self, channel: Any) -> None:
        """Move to another voice channel of the guild (Discord then sends the updates we follow)."""
        await self.guild.change_voice_state(channel=channel, self_mute=self._self_mute,
                                            self_deaf=self._self_deaf)
