"""Client: one bot's voice connection in one guild — the thread-safe facade over gateway and engine.

What it owns: the connection's lifecycle (server info → gateway → session → native sending), its
playables, its volume, its events and its stats. Every public method returns at once and may be
called from any thread or asyncio loop; the work happens on the engine's io thread (signalling) and
media threads (audio). Only ``wait_*`` calls block. Callbacks registered with :meth:`Client.on` run on
the io thread: keep them short (a slow callback delays signalling, never audio).

What it must not do: per-frame work. Audio goes straight from the playables' native buffers to the
media threads.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import ssl as _ssl
import threading
import time
import weakref
from typing import Any, Callable

from telecom.engine import (
    EV_ENCODE_ERROR,
    EV_FRAME_ENCRYPTOR_ERROR,
    EV_SEND_ERROR,
    EV_SPEAKING_START,
    EV_SPEAKING_STOP,
    get_engine,
)
from telecom.errors import (
    ClientClosed,
    ConfigurationError,
    ConnectTimeout,
    GatewayError,
    TelecomError,
)
from telecom.playable import Playable, _check_percent
from telecom.events import Event, EventEmitter
from telecom.protocol import SpeakingFlags, close_action

log = logging.getLogger("telecom.client")

# Every client (weak: a dropped client is not kept alive), for the exit hook below.
_all_clients: "weakref.WeakSet[Client]" = weakref.WeakSet()
CLOSE_AT_EXIT_TIMEOUT = 2.0


@atexit.register
def _close_clients_at_exit() -> None:
    """Interpreter exit: leave the voice channels properly — close the clients still open and wait
    for every close handshake, including those of clients closed just before exit. Without this the
    io thread dies with the process, the voice server sees a dropped, resumable connection, and the
    others see the bot in the channel until the server gives up on it. At most CLOSE_AT_EXIT_TIMEOUT."""
    clients = list(_all_clients)
    for client in clients:
        try:
            client.close()
        except Exception:  # noqa: BLE001 - one client must not keep the others in the channel
            log.exception("closing %r at exit failed", client)
    deadline = time.monotonic() + CLOSE_AT_EXIT_TIMEOUT
    for client in clients:
        if client._engine.in_loop():
            return
        client._retired.wait(max(0.0, deadline - time.monotonic()))


def _snowflake(value: Any, what: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{what} must be a Discord snowflake (int or digit string), "
                                 f"not {value!r}") from None
    if not 0 < number < 2**64:
        raise ConfigurationError(f"{what} {value!r} is out of range for a snowflake")
    return number


def _ssl_option(value: Any) -> _ssl.SSLContext | None:
    if value is None or isinstance(value, _ssl.SSLContext):
        return value
    if isinstance(value, (str, os.PathLike)):
        return _ssl.create_default_context(cafile=os.fspath(value))
    raise ConfigurationError("ssl must be an ssl.SSLContext, a CA file path or None")


class _CurrentGatewayListener:
    """Forwards a gateway's callbacks to its client only while it is the client's current gateway,
    so a retired gateway (after a new ``set_server_info``) cannot disturb the new connection."""

    def __init__(self, client: "Client") -> None:
        self._client = client
        self._gateway: Any = None

    def __getattr__(self, name: str) -> Callable[..., None]:
        target = getattr(self._client, name)

        def forward(*args: Any, **kwargs: Any) -> None:
            gateway = self._gateway
            if gateway is None or gateway is self._client._gateway:
                target(*args, **kwargs)
        return forward


class User:
    """Another member of the voice channel, as this client sees it."""

    def __init__(self, client: "Client", user_id: int) -> None:
        self._client = client
        self.id = user_id
        self.ssrc: int | None = None
        self.speaking = False

    def set_output(self, output: Any) -> Any:
        """Send this user's received audio to ``output`` (an :class:`~telecom.Output`; None removes it).

        >>> client.get_user(uid).set_output(Output.to_file("bob.flac"))   # doctest: +SKIP
        """
        return self._client._set_user_output(self.id, output)

    @property
    def output(self) -> Any:
        return self._client._user_outputs.get(self.id)

    def __repr__(self) -> str:
        return f"<User id={self.id} ssrc={self.ssrc} speaking={self.speaking}>"


class Client(EventEmitter):
    """A voice connection. The seed's shape::

        client = Client(user_id, guild_id, session_id, channel_id=channel_id)
        client.set_server_info(endpoint, token)   # from VOICE_SERVER_UPDATE
        client.wait_ready(timeout=10)             # or: await client.ready()
        pipe = Playable.from_pcm_pipe(); client.play(pipe); pipe.send(pcm)
        client.set_volume(70)
        client.close()

    Opus options (per client): ``bitrate`` (default 64 kbit/s, the default voice-channel bitrate),
    ``complexity`` (10), ``fec`` (off: in-band FEC multiplies encode cost 3.5-6x) with
    ``expected_loss`` percent used only when FEC is on.
    """

    def __init__(self, user_id: int | str, guild_id: int | str, session_id: str,
                 channel_id: int | str | None = None, *, bitrate: int = 64000, complexity: int = 10,
                 fec: bool = False, expected_loss: int = 10, ssl: Any = None,
                 gateway_config: Any = None) -> None:
        self.user_id = _snowflake(user_id, "user_id")
        self.guild_id = _snowflake(guild_id, "guild_id")
        if not isinstance(session_id, str) or not session_id:
            raise ConfigurationError("session_id must be a non-empty string")
        self.session_id = session_id
        self.channel_id = None if channel_id is None else _snowflake(channel_id, "channel_id")
        self._ssl = _ssl_option(ssl)
        self._gateway_config = gateway_config
        self._server_wait_generation = 0
        self._engine = get_engine()
        self._conn = self._engine.new_connection(self, bitrate=bitrate, complexity=complexity,
                                                 fec=fec, expected_loss=expected_loss)
        self._lock = threading.RLock()
        EventEmitter.__init__(self)
        self._ready = threading.Event()
        self._ready_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._error: BaseException | None = None
        self._closed = False
        self._retired = threading.Event()  # set once close() has finished (the gateway's close handshake)
        _all_clients.add(self)
        self._gateway: Any = None
        self._gateway_task: asyncio.Task | None = None
        self._keepalive_task: asyncio.Task | None = None
        self._session: Any = None          # SessionInfo of the current session
        self._state = "idle"
        self._playables: dict[int, Playable] = {}
        self._users: dict[int, User] = {}
        self._volume = 100.0
        self._dave: Any = None             # telecom.dave.DaveSessionManager while DAVE is negotiated
        # receiving (telecom.receive): the process's receiver while this client is registered in it
        self._rx: Any = None
        self._rx_stats: dict | None = None  # the last counters, kept when receiving stops
        self._user_outputs: dict[int, Any] = {}
        self._muxer: Any = None
        self._self_tap: Any = None
        self._frame_decryptor: Callable[[int, bytes], bytes | None] | None = None

    # -- connecting ----------------------------------------------------------------------------------
    def set_server_info(self, endpoint: str | None, token: str | None,
                        channel_id: int | str | None = None, *, session_id: str | None = None,
                        ssl: Any = None) -> None:
        """Connect (in the background) with VOICE_SERVER_UPDATE's ``endpoint`` and ``token``.

        ``endpoint`` as Discord sends it (``host:port``: wss with certificate verification), an explicit
        ``ws://``/``wss://`` URL, or ``None``: the server is being reallocated, so the current connection
        is dropped and the client waits for the next call. ``session_id``: a new main-gateway session
        (after a re-join that a 4006/4009 ``disconnect`` event asked for, ``action="new_session"``).
        """
        from telecom.gateway import voice_gateway_url

        self._check_open()
        if session_id is not None:
            if not isinstance(session_id, str) or not session_id:
                raise ConfigurationError("session_id must be a non-empty string")
            self.session_id = session_id
        if channel_id is not None:
            self.channel_id = _snowflake(channel_id, "channel_id")
        if ssl is not None:
            self._ssl = _ssl_option(ssl)
        if endpoint is None:
            self._set_state("waiting_for_server")
            self._engine.call_soon(self._start_gateway, None, None)
            return
        if not isinstance(token, str) or not token:
            raise ConfigurationError("token must be a non-empty string")
        voice_gateway_url(endpoint)  # validates now: a bad endpoint is the caller's error, at once
        with self._lock:
            self._ready.clear()
            self._error = None
        self._engine.call_soon(self._start_gateway, endpoint, token)

    def _start_gateway(self, endpoint: str | None, token: str | None) -> None:
        # io loop
        self._server_wait_generation += 1  # a pending 4014/4022 wait is answered
        old_task, old_gateway = self._gateway_task, self._gateway
        self._gateway = self._gateway_task = None
        self._stop_sending()
        if old_gateway is not None:
            self._engine.loop.create_task(self._retire(old_gateway, old_task))
        if endpoint is None or self._closed:
            return
        from telecom.gateway import VoiceGateway

        kwargs = {}
        if self._gateway_config is not None:
            kwargs["config"] = self._gateway_config
        listener = _CurrentGatewayListener(self)
        self._gateway = VoiceGateway(
            endpoint=endpoint, server_id=self.guild_id, user_id=self.user_id,
            session_id=self.session_id, token=token, listener=listener, ssl=self._ssl, **kwargs)
        listener._gateway = self._gateway
        self._set_state("connecting")
        self._gateway_task = self._engine.loop.create_task(self._run_gateway(self._gateway))

    async def _run_gateway(self, gateway: Any) -> None:
        try:
            await gateway.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - becomes an event, never a silent death
            if gateway is self._gateway:
                self.on_closed(getattr(exc, "code", None), exc)

    async def _retire(self, gateway: Any, task: asyncio.Task | None) -> None:
        try:
            await gateway.close()
        except Exception:  # noqa: BLE001
            log.debug("closing the previous gateway failed", exc_info=True)
        if task is not None:
            task.cancel()

    def wait_ready(self, timeout: float | None = 10.0) -> None:
        """Block until the connection can send audio. Raises the connection's error, or ConnectTimeout."""
        if self._engine.in_loop():
            raise TelecomError("wait_ready() would block telecom's io thread; use 'await client.ready()'")
        if not self._ready.wait(timeout):
            raise ConnectTimeout(f"voice connection not ready within {timeout} s (state: {self._state})")
        if self._error is not None:
            raise self._error

    async def ready(self, timeout: float | None = 10.0) -> None:
        """``await`` until the connection can send audio (any asyncio loop)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            if self._ready.is_set():
                fut.set_result(None)
            else:
                self._ready_waiters.append((loop, fut))
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise ConnectTimeout(f"voice connection not ready within {timeout} s "
                                 f"(state: {self._state})") from None
        finally:
            with self._lock:  # a waiter that gave up (timeout, cancel) must not be woken later
                if (loop, fut) in self._ready_waiters:
                    self._ready_waiters.remove((loop, fut))
        if self._error is not None:
            raise self._error

    def _set_ready(self, error: BaseException | None = None) -> None:
        with self._lock:
            self._error = error
            self._ready.set()
            waiters, self._ready_waiters = self._ready_waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(lambda f=fut: f.done() or f.set_result(None))
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass

    # -- gateway listener (io loop) ------------------------------------------------------------------
    def on_session(self, info: Any) -> None:
        if info.dave_protocol_version > 0 and self.channel_id is None:
            self._fail(ConfigurationError(
                "this channel requires DAVE end-to-end encryption, whose group id is the channel id: "
                "pass channel_id to Client(...) or set_server_info(...)"))
            return
        self._session = info
        self._conn.configure(info.sock.fileno(), info.ssrc, info.mode, info.secret_key)
        self._start_receiving(info)
        try:
            self._start_dave(info.dave_protocol_version)
        except TelecomError as exc:
            self._fail(exc)
            return
        self._start_keepalive(info.sock)
        self._set_state("ready")
        # The event first: an awaiting caller must see "ready" before anything its wake-up causes.
        self._emit("ready", ssrc=info.ssrc, mode=info.mode,
                   dave_protocol_version=info.dave_protocol_version)
        self._set_ready()

    def on_resumed(self) -> None:
        # The session survived (SSRC, key, the server's speaking state), so audio keeps flowing:
        # stopping it until op 5 is re-sent would cut a gap into the talk spurt (seq contiguous,
        # timestamp +2-3 frames) for nothing. op 5 is announced again, as discord.js does, for a
        # server that lost it with the socket.
        # (A Speaking request still pending was queued by the gateway and goes out after op 9.)
        if self._conn.speaking == "active" and self._gateway is not None:
            self._gateway.send_speaking(int(SpeakingFlags.MICROPHONE))
        self._emit("resumed")

    def on_speaking(self, user_id: int, ssrc: int, flags: int) -> None:
        user = self.get_user(user_id)
        user.ssrc = ssrc
        rx = self._rx
        if rx is not None:
            rx.core.map_ssrc(self._conn.id, ssrc, user.id)   # releases audio held for this SSRC
        self._set_speaking(user, bool(flags), ssrc, "gateway")

    def on_clients_connect(self, user_ids: list[int]) -> None:
        if self._dave is not None:
            self._dave.users_connected(user_ids)  # who DAVE may add to the group (spec §3.2)
        for uid in user_ids:
            self.get_user(uid)
            self._emit("user_join", user_id=uid)

    def on_client_disconnect(self, user_id: int) -> None:
        if self._dave is not None:
            self._dave.user_disconnected(user_id)
        with self._lock:
            user = self._users.pop(int(user_id), None)
        rx = self._rx
        if rx is not None:
            rx.core.unmap_user(self._conn.id, int(user_id))  # spec §2.7: drop the mapping on op 13
        if user is not None and user.speaking:
            user.speaking = False
            self._emit("speaking_stop", user_id=user.id, ssrc=user.ssrc, source="gateway")
        self._emit("user_leave", user_id=user_id)

    def on_dave_message(self, op: int, payload: object) -> None:
        if self._dave is None:
            if (op == 24 and isinstance(payload, dict) and payload.get("epoch") == 1
                    and int(payload.get("protocol_version") or 0) > 0 and self.channel_id is not None):
                # A transport-only call is being upgraded: start DAVE now (its first op 26 answers op 24).
                try:
                    self._start_dave(int(payload["protocol_version"]))
                except TelecomError as exc:
                    self._emit("error", error=exc)
                return
            log.debug("DAVE op %s ignored: DAVE is not negotiated on this session", op)
            return
        self._dave.handle(op, payload)

    # -- DAVE (io loop) ------------------------------------------------------------------------------
    def _start_dave(self, version: int) -> None:
        """A new session: drop any previous DAVE state; with ``version > 0`` start it (op 26)."""
        self._stop_dave()
        if version <= 0:
            return
        from telecom.dave import DaveSessionManager

        def send_json(op: int, d: Any) -> None:
            if self._gateway is not None:
                self._gateway.send_json(op, d)

        def send_binary(op: int, payload: bytes) -> None:
            if self._gateway is not None:
                self._gateway.send_binary(op, payload)

        assert self.channel_id is not None
        self._dave = DaveSessionManager(
            self.user_id, self.channel_id, version, send_json=send_json, send_binary=send_binary,
            emit=lambda kind, **data: self._emit("dave", kind=kind, **data),
            on_can_encrypt=self._dave_can_encrypt, schedule=self._engine.call_soon)
        with self._lock:
            known = list(self._users)
        self._dave.users_connected(known)
        self.set_frame_decryptor(self._dave.decrypt)  # received frames: DAVE first, then Opus
        self._dave.start()

    def _stop_dave(self) -> None:
        dave, self._dave = self._dave, None
        if dave is None:
            return
        dave.close()
        if not self._closed:
            self._dave_can_encrypt(False)
            if self._frame_decryptor == dave.decrypt:
                self.set_frame_decryptor(None)

    def _dave_can_encrypt(self, can: bool) -> None:
        # Plain Opus until the group is ready (discord.py: can_encrypt = version != 0 and ready).
        dave = self._dave
        if self._closed:
            return
        self._conn.set_frame_encryptor(dave.encrypt if can and dave is not None else None)

    def on_state(self, state: str, detail: str = "") -> None:
        self._set_state(state)

    def on_closed(self, code: int | None, error: BaseException | None) -> None:
        self._stop_sending()
        # Without a close code: our own close ("closed"), or the gateway gave up reconnecting ("fatal").
        action = close_action(code) if code is not None else ("fatal" if error is not None else "closed")
        if action == "wait_server_update" and not self._closed:
            # Moved to another channel/server, or a region change: Discord follows with a
            # VOICE_SERVER_UPDATE. Playables stay attached; set_server_info() carries on from here.
            self._set_state("waiting_for_server")
            wait = getattr(self._gateway_config, "server_update_wait", 5.0)
            generation = self._server_wait_generation
            self._engine.loop.call_later(wait, self._server_wait_over, generation, code, error)
            self._emit("waiting_for_server", code=code)
            return
        self._report_disconnect(code, error, action)

    def _server_wait_over(self, generation: int, code: int | None, error: BaseException | None) -> None:
        if generation == self._server_wait_generation and not self._closed:
            self._report_disconnect(code, error, "wait_server_update")

    def _report_disconnect(self, code: int | None, error: BaseException | None, action: str) -> None:
        self._set_state("disconnected")
        if error is None:
            error = GatewayError(f"voice connection closed (code {code})", code=code)
        self._set_ready(error)
        # action (telecom.protocol.CLOSE_ACTIONS): "new_session" = the credentials are dead, re-join
        # through the main gateway and call set_server_info again (the adapters do this).
        self._emit("disconnect", code=code, error=error, action=action)

    def _fail(self, error: TelecomError) -> None:
        gateway = self._gateway
        self._gateway = None
        if gateway is not None:
            self._engine.loop.create_task(self._retire(gateway, self._gateway_task))
        self._stop_sending()
        self._set_state("failed")
        self._set_ready(error)
        self._emit("error", error=error)

    def _stop_sending(self) -> None:
        self._stop_receiving()
        self._stop_dave()
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
            self._keepalive_task = None
        if not self._closed:
            self._conn.unconfigure()

    def _start_keepalive(self, sock: Any) -> None:
        from telecom.udp import send_keepalives

        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
        self._keepalive_task = self._engine.loop.create_task(send_keepalives(sock))

    # -- engine listener (io loop) -------------------------------------------------------------------
    def handle_engine_event(self, kind: str, conn_id: int, value: int) -> None:
        if kind == EV_SPEAKING_START:
            self._engine.loop.create_task(self._speak())
        elif kind == EV_SPEAKING_STOP:
            if self._gateway is not None and self._session is not None:
                self._gateway.send_speaking(int(SpeakingFlags.NONE))
        elif kind in (EV_SEND_ERROR, EV_ENCODE_ERROR, EV_FRAME_ENCRYPTOR_ERROR):
            self._emit("error", error=TelecomError(f"{kind.replace('_', ' ')} ({value})"), code=value)

    async def _speak(self) -> None:
        gateway = self._gateway
        if gateway is None or self._session is None:
            return
        try:
            await gateway.speaking(int(SpeakingFlags.MICROPHONE))
        except Exception as exc:  # noqa: BLE001 - the gateway reports its own failure separately
            log.debug("could not send Speaking: %r", exc)
            return
        if not self._closed:
            self._conn.confirm_speaking()

    def _playable_ended(self, playable: Playable) -> None:
        with self._lock:
            self._playables.pop(playable.id, None)
        self._emit("track_end", playable=playable, reason=getattr(playable, "end_reason", "finished"),
                   error=getattr(playable, "error", None))

    def _playable_error(self, playable: Playable, error: BaseException) -> None:
        # A URL/file track failed in its decode thread (HTTP status, TLS, dropped stream, bad data).
        self._emit("track_error", playable=playable, error=error, cause=str(error))

    # -- receiving ---------------------------------------------------------------------------------
    def _start_receiving(self, info: Any) -> None:
        # io loop: the new session's socket and key go to the native receive core
        from telecom.receive import get_receiver

        rx = get_receiver()
        rx.add_connection(self, self._conn.id, info.sock.fileno(), info.mode, bytes(info.secret_key))
        self._rx = rx
        with self._lock:
            known = [(u.id, u.ssrc) for u in self._users.values() if u.ssrc is not None]
            outputs = dict(self._user_outputs)
        for uid, ssrc in known:
            rx.core.map_ssrc(self._conn.id, ssrc, uid)
        for uid, output in outputs.items():
            rx.set_user_output(self._conn.id, uid, output)
        if self._frame_decryptor is not None:
            rx.core.set_decryptor(self._conn.id, self._frame_decryptor)
        if self._muxer is not None:
            rx.core.attach_muxer(self._conn.id, self._muxer._register())

    def _stop_receiving(self, close_outputs: bool = False) -> None:
        rx, self._rx = self._rx, None
        if rx is not None:
            self._rx_stats = rx.remove_connection(self._conn.id) or self._rx_stats
        if close_outputs:
            with self._lock:
                outputs, self._user_outputs = list(self._user_outputs.values()), {}
                muxer, self._muxer = self._muxer, None
                tap, self._self_tap = self._self_tap, None
            if tap is not None:
                tap.detach()
            if rx is not None:
                rx.drop_outputs(self._conn.id)
            for output in outputs:
                output.close()
            if muxer is not None:
                muxer.close()

    def _set_user_output(self, user_id: int, output: Any) -> Any:
        from telecom.output import Output

        if output is not None and not isinstance(output, Output):
            raise ConfigurationError(f"set_output() takes an Output or None, not {type(output).__name__}")
        self._check_open()
        with self._lock:
            if output is None:
                self._user_outputs.pop(user_id, None)
            else:
                self._user_outputs[user_id] = output
        rx = self._rx
        if rx is not None:
            rx.set_user_output(self._conn.id, user_id, output)
        return output

    def set_output_muxer(self, muxer: Any) -> Any:
        """Mix everyone this client hears (and, with ``include_self``, what it sends) into ``muxer``
        (from :meth:`Output.muxer`); None detaches. Closing the client closes the muxer."""
        from telecom.output import Muxer, _SelfTap

        if muxer is not None and not isinstance(muxer, Muxer):
            raise ConfigurationError(f"set_output_muxer() takes a Muxer or None, not {type(muxer).__name__}")
        self._check_open()
        mux_id = muxer._register() if muxer is not None else 0
        with self._lock:
            self._muxer = muxer
            previous_tap, self._self_tap = self._self_tap, None
        if previous_tap is not None:
            previous_tap.detach()
        if muxer is not None and muxer.include_self:
            tap = _SelfTap(self, muxer)
            with self._lock:
                self._self_tap = tap
        rx = self._rx
        if rx is not None:
            rx.core.attach_muxer(self._conn.id, mux_id)
        return muxer

    def set_frame_decryptor(self, fn: Callable[[int, bytes], bytes | None] | None) -> None:
        """DAVE hook: ``fn(user_id, payload) -> bytes | None`` for every received non-silence frame
        (None: drop it, counted in ``dave_failures``). Called on the receive thread with the GIL
        taken once per receive round for all of that round's frames; it must not call into this
        client's receive methods. None removes it."""
        if fn is not None and not callable(fn):
            raise ConfigurationError("the frame decryptor must be callable or None")
        self._frame_decryptor = fn
        rx = self._rx
        if rx is not None:
            rx.core.set_decryptor(self._conn.id, fn)

    def _set_speaking(self, user: User, active: bool, ssrc: int | None, source: str) -> None:
        # From op 5 (io loop) and from audio activity (output worker): one state, one event per change.
        with self._lock:
            if user.speaking == active:
                return
            user.speaking = active
        self._emit("speaking_start" if active else "speaking_stop", user_id=user.id, ssrc=ssrc, source=source)

    def _audio_activity(self, user_id: int, ssrc: int, active: bool) -> None:
        # output worker thread: a talk spurt started/ended in the jitter buffer
        if self._closed:
            return
        with self._lock:
            user = self._users.get(user_id)
        if user is None:
            if not active:
                return          # the end of a spurt of someone who already left (op 13)
            user = self.get_user(user_id)
        self._set_speaking(user, active, ssrc, "audio")

    # -- playing -----------------------------------------------------------------------------------
    def play(self, playable: Playable, *, replace: bool = False) -> Playable:
        """Start playing (mixed with whatever else plays; ``replace=True`` stops the others first,
        their ``track_end`` reason is ``replaced``). Returns the playable."""
        self._check_open()
        if not isinstance(playable, Playable):
            raise ConfigurationError(f"play() takes a Playable, not {type(playable).__name__}")
        if playable.state in ("stopped", "ended"):
            raise ConfigurationError("this playable has already ended; create a new one")
        if replace:
            for other in self.playables:
                if other is not playable:
                    other._end_reason = other._end_reason or "replaced"
                    other.stop()
        if self._conn.attach(playable._source):
            playable._attach(self)
            with self._lock:
                self._playables[playable.id] = playable
            self._emit("track_start", playable=playable)
        return playable

    def stop(self) -> None:
        """Stop every playable on this client."""
        with self._lock:
            playing = list(self._playables.values())
        for p in playing:
            p.stop()

    @property
    def playables(self) -> list[Playable]:
        with self._lock:
            return list(self._playables.values())

    def set_volume(self, percent: float) -> None:
        """Client volume in percent (0..200), applied on top of each playable's, ramped over one frame."""
        value = _check_percent(percent)
        self._check_open()
        self._volume = value
        self._conn.set_gain(value / 100.0)

    @property
    def volume(self) -> float:
        return self._volume

    def set_encoder(self, *, bitrate: int = 64000, complexity: int = 10, fec: bool = False,
                    expected_loss: int = 10) -> None:
        """Change the Opus settings live."""
        self._check_open()
        self._conn.set_encoder(bitrate, complexity, fec, expected_loss)

    # -- users, events, stats ------------------------------------------------------------------------
    def get_user(self, user_id: int | str) -> User:
        uid = _snowflake(user_id, "user_id")
        with self._lock:
            user = self._users.get(uid)
            if user is None:
                user = self._users[uid] = User(self, uid)
            return user

    def on(self, event: str, callback: Callable[[Event], Any]) -> Callable[[Event], Any]:
        """Call ``callback(event)`` on the io thread for each event named ``event`` (``"*"``: all); an
        ``async def`` callback runs as a task on the io loop. ``async for event in client.events()``
        delivers on your own loop instead.

        Events: ready, resumed, waiting_for_server, disconnect (``code``, ``action``), error,
        speaking_start, speaking_stop, user_join, user_leave, dave (``kind``: session_started, epoch,
        transition_prepared, transition_executed, downgraded, upgraded, prepare_epoch, invalid_commit,
        error), track_start, track_end (``reason``: finished, stopped, replaced, error), track_error
        (``error``, ``cause``), state, closed.
        """
        return super().on(event, callback)

    def _dispatch(self, handlers: list[Callable], event: Event) -> None:
        # Callbacks run on the io thread, never on the media threads or the caller's.
        self._engine.call_soon(self._run_handlers, handlers, event)

    def _schedule_coroutine(self, coro: Any) -> None:
        self._engine.loop.create_task(coro)

    def _set_state(self, state: str) -> None:
        if state != self._state:
            self._state = state
            self._emit("state", state=state)

    @property
    def state(self) -> str:
        return self._state

    def stats(self) -> dict:
        """A snapshot: connection state, gateway latency, send counters, playables."""
        session = self._session
        gateway = self._gateway
        out = {
            "state": self._state,
            "user_id": self.user_id,
            "guild_id": self.guild_id,
            "channel_id": self.channel_id,
            "ssrc": session.ssrc if session else None,
            "mode": session.mode if session else None,
            "dave_protocol_version": session.dave_protocol_version if session else None,
            "latency_ms": (gateway.latency * 1000.0 if gateway is not None and gateway.latency else None),
            "volume": self._volume,
            "media_thread": self._conn.thread_index,
            "events_dropped": self.events_dropped,
        }
        if not self._closed:
            out.update(self._conn.stats())
            out["speaking"] = self._conn.speaking
        dave = self._dave
        if dave is not None:
            out.update(dave.stats())
        else:
            out.update({"dave_status": None, "epoch": None, "voice_privacy_code": None})
        out["playables"] = [p.stats() for p in self.playables]
        rx = self._rx
        if rx is not None:
            self._rx_stats = rx.core.conn_stats(self._conn.id) or self._rx_stats
        out["receive"] = self._rx_stats
        return out

    @property
    def voice_privacy_code(self) -> str | None:
        """DAVE's 30-digit voice privacy code of the current epoch (None without an E2EE group)."""
        dave = self._dave
        return dave.voice_privacy_code if dave is not None else None

    # -- closing ---------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("this client is closed")

    def close(self) -> None:
        """Disconnect and free the connection (returns at once; idempotent). The leave itself (the
        gateway's close handshake) finishes in the background: :meth:`wait_closed` waits for it, and
        at interpreter exit telecom waits for it on its own (up to 2 s)."""
        if self._closed:
            return
        self._closed = True
        self._engine.call_soon(self._shutdown)

    def wait_closed(self, timeout: float | None = 5.0) -> bool:
        """Block until :meth:`close` has finished leaving: the voice server has seen the close
        handshake, so the others see this member leave at once. True if it did within ``timeout``.

        >>> client.close(); client.wait_closed()  # doctest: +SKIP
        True
        """
        if self._engine.in_loop():
            raise TelecomError("wait_closed() would block telecom's io thread")
        if not self._closed:
            raise TelecomError("wait_closed() before close(): the client is still open")
        return self._retired.wait(timeout)

    def _shutdown(self) -> None:
        gateway, task = self._gateway, self._gateway_task
        self._gateway = self._gateway_task = None
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
        for p in self.playables:
            p.stop()
        self._stop_dave()
        self._stop_receiving(close_outputs=True)
        self._conn.close()
        if gateway is not None:
            self._engine.loop.create_task(self._retire_closed(gateway, task))
        else:
            self._retired.set()
        self._set_state("closed")
        self._set_ready(ClientClosed("the client was closed"))
        self._emit("closed")

    async def _retire_closed(self, gateway: Any, task: asyncio.Task | None) -> None:
        try:
            try:
                await gateway.close()
            except Exception:  # noqa: BLE001
                log.debug("gateway close failed", exc_info=True)
            if task is not None:
                task.cancel()
            session = self._session
            if session is not None:
                session.sock.close()
        finally:
            self._retired.set()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Client user_id={self.user_id} guild_id={self.guild_id} channel_id={self.channel_id} "
                f"state={self._state}>")
