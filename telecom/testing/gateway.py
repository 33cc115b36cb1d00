"""The voice gateway v8 websocket side of the local voice server (spec §1).

Owns one :class:`GatewayConnection` per websocket: the version check on the URL, Hello, reading
and answering ops (Identify, Select Protocol, Heartbeat, Speaking, Resume), the heartbeat-timeout
watchdog, and the per-socket writer that keeps frames (and a server close) in order. Session state
(SSRC, key, ``seq``, resume buffer) lives in :mod:`telecom.testing.session`; who is in which channel
and what happens when someone leaves lives in :mod:`telecom.testing.server`. It imports nothing
from telecom but the error module (it must stay independent of the client code it checks).

Choices where the spec is silent (each is what Discord does as far as observed, or the strict
reading):

* ``/?v=N``: a missing ``v`` or ``v < 4`` is accepted as a websocket and closed at once with 4020.
  Versions 4–7 get the v8 behaviour except that a bare-integer heartbeat is acknowledged with a bare
  integer.
* Heartbeat (op 3) is allowed before Identify; every other op before Identify closes with 4003.
  Binary frames before Identify also close with 4003.
* No heartbeat for ``session_timeout`` seconds (default 2 × the Hello interval) → 4009, and the
  session is over (not resumable).
* A client close with 1000/1001 means "leaving": the member leaves at once (discord.py closes with
  4000 when it means to resume, precisely because Discord ends the session on 1000). Any other
  client close, or a dropped TCP connection, leaves the session resumable for ``member_leave_grace``.
* Ready's ``heartbeat_interval`` is deliberately bogus (1), as on Discord; clients must use Hello's.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

if TYPE_CHECKING:  # pragma: no cover
    from telecom.testing.server import LocalVoiceServer
    from telecom.testing.session import VoiceSession

log = logging.getLogger("telecom.testing.gateway")


class Op(IntEnum):
    IDENTIFY = 0
    SELECT_PROTOCOL = 1
    READY = 2
    HEARTBEAT = 3
    SESSION_DESCRIPTION = 4
    SPEAKING = 5
    HEARTBEAT_ACK = 6
    RESUME = 7
    HELLO = 8
    RESUMED = 9
    CLIENTS_CONNECT = 11
    CLIENT_DISCONNECT = 13
    DAVE_PREPARE_TRANSITION = 21
    DAVE_EXECUTE_TRANSITION = 22
    DAVE_TRANSITION_READY = 23
    DAVE_PREPARE_EPOCH = 24
    DAVE_MLS_EXTERNAL_SENDER = 25
    DAVE_MLS_KEY_PACKAGE = 26
    DAVE_MLS_PROPOSALS = 27
    DAVE_MLS_COMMIT_WELCOME = 28
    DAVE_MLS_ANNOUNCE_COMMIT_TRANSITION = 29
    DAVE_MLS_WELCOME = 30
    DAVE_MLS_INVALID_COMMIT_WELCOME = 31


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    UNKNOWN_OPCODE = 4001
    DECODE_ERROR = 4002
    NOT_AUTHENTICATED = 4003
    AUTHENTICATION_FAILED = 4004
    ALREADY_AUTHENTICATED = 4005
    SESSION_NO_LONGER_VALID = 4006
    SESSION_TIMEOUT = 4009
    SERVER_NOT_FOUND = 4011
    UNKNOWN_PROTOCOL = 4012
    DISCONNECTED = 4014
    VOICE_SERVER_CRASHED = 4015
    UNKNOWN_ENCRYPTION_MODE = 4016
    E2EE_REQUIRED = 4017
    BAD_REQUEST = 4020
    RATE_LIMITED = 4021
    CALL_TERMINATED = 4022


def is_resumable_close(code: int) -> bool:
    """Server closes after which the session stays resumable (spec §1.8): 4015 and < 4000 but 1000."""
    return code == CloseCode.VOICE_SERVER_CRASHED or (code < 4000 and code != CloseCode.NORMAL)


_CLOSE = object()
_STOP = object()


class GatewayConnection:
    """One websocket. Created by the aiohttp handler; ``run()`` returns when the socket is gone."""

    def __init__(self, server: LocalVoiceServer, request: web.Request, ws: web.WebSocketResponse) -> None:
        self.server = server
        self.request = request
        self.ws = ws
        self.version: int | None = None
        self.session: VoiceSession | None = None
        self.closing = False
        self.server_close_code: int | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._unattributed_log: list[dict[str, Any]] = []
        self._last_heartbeat = time.monotonic()

    # -- outgoing ---------------------------------------------------------------------------

    def enqueue(self, frame: str | bytes) -> None:
        if not self.closing:
            self._queue.put_nowait(frame)

    def send_unsequenced(self, op: int, d: Any) -> None:
        self.enqueue(json.dumps({"op": op, "d": d}, separators=(",", ":")))

    def close(self, code: int, reason: str = "") -> None:
        """Close after the frames already queued (the close frame goes out in order)."""
        if self.closing:
            return
        self.closing = True
        self.server_close_code = code
        self._queue.put_nowait((_CLOSE, code, reason))

    def drop(self) -> None:
        """Abort the TCP connection: no close frame, the client sees an abnormal closure (1006)."""
        self.closing = True
        transport = self.request.transport
        if transport is not None:
            transport.abort()
        self._queue.put_nowait(_STOP)

    async def _writer(self) -> None:
        while True:
            item = await self._queue.get()
            if item is _STOP:
                return
            try:
                if isinstance(item, tuple) and item[0] is _CLOSE:
                    await self.ws.close(code=item[1], message=item[2].encode()[:123])
                    return
                if isinstance(item, bytes):
                    await self.ws.send_bytes(item)
                else:
                    await self.ws.send_str(item)
            except (ConnectionError, RuntimeError):  # the socket went away under us
                return

    async def _watchdog(self) -> None:
        timeout = self.server.session_timeout
        while not self.closing:
            await asyncio.sleep(min(timeout / 4, 1.0))
            if time.monotonic() - self._last_heartbeat > timeout:
                with self.server._lock:
                    self._fatal(CloseCode.SESSION_TIMEOUT, "session timed out (no heartbeat)")
                return

    # -- the socket's life --------------------------------------------------------------------

    async def run(self) -> None:
        writer = asyncio.ensure_future(self._writer())
        watchdog: asyncio.Future[None] | None = None
        try:
            raw_v = self.request.query.get("v")
            try:
                self.version = int(raw_v) if raw_v is not None else None
            except ValueError:
                self.version = None
            if self.version is None or self.version < 4:
                self.close(CloseCode.BAD_REQUEST, "unsupported or missing gateway version (use ?v=8)")
            else:
                self.send_unsequenced(
                    Op.HELLO,
                    {"v": min(self.version, 8), "heartbeat_interval": self.server.heartbeat_interval_ms},
                )
                watchdog = asyncio.ensure_future(self._watchdog())
                async for msg in self.ws:
                    if self.closing:
                        continue
                    if msg.type == WSMsgType.TEXT:
                        self._on_text(msg.data)
                    elif msg.type == WSMsgType.BINARY:
                        self._on_binary(bytes(msg.data))
                    elif msg.type in (WSMsgType.ERROR, WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                        break
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if not self.closing:
                self.closing = True
                self._queue.put_nowait(_STOP)
            try:
                await asyncio.wait_for(writer, 2.0)
            except (asyncio.TimeoutError, Exception):
                writer.cancel()
            with self.server._lock:
                self.server._connection_lost(self, self.ws.close_code)

    # -- incoming -------------------------------------------------------------------------------

    def _log(self, entry: dict[str, Any]) -> None:
        if self.session is not None:
            self.server._gateway_logs.setdefault(self.session.user_id, []).append(entry)
        else:
            self._unattributed_log.append(entry)

    def _attach_log(self, session: VoiceSession | None = None) -> None:
        """Credit what this socket sent so far to the user whose valid credentials it presented."""
        session = session if session is not None else self.session
        assert session is not None
        self.server._gateway_logs.setdefault(session.user_id, []).extend(self._unattributed_log)
        self._unattributed_log.clear()

    def _fatal(self, code: int, reason: str) -> None:
        """Close with a code after which the session is over (the member leaves at once)."""
        session = self.session
        self.close(code, reason)
        if session is not None and session.connection is self:
            self.server._end_session(session)

    def _on_text(self, text: str) -> None:
        try:
            message = json.loads(text)
            if not isinstance(message, dict) or not isinstance(message.get("op"), int):
                raise ValueError("not an object with an integer op")
        except ValueError:
            with self.server._lock:
                self._log({"undecodable": text})
                self._fatal(CloseCode.DECODE_ERROR, "failed to decode payload")
            return
        with self.server._lock:
            self._log(message)
            try:
                self._dispatch(message["op"], message.get("d"))
            except Exception:  # a server bug must not kill the socket silently
                log.exception("local voice server: error handling op %s", message.get("op"))
                self._fatal(CloseCode.BAD_REQUEST, "server error handling the payload")

    def _on_binary(self, data: bytes) -> None:
        with self.server._lock:
            self._log({"op": data[0] if data else None, "binary": data[1:]})
            if self.session is None or not data:
                self._fatal(CloseCode.NOT_AUTHENTICATED, "not authenticated")
                return
            self.server.dave_hooks.on_binary(self.session, data[0], data[1:])

    def _dispatch(self, op: int, d: Any) -> None:
        if op == Op.HEARTBEAT:
            self._on_heartbeat(d)
        elif op == Op.IDENTIFY:
            self._on_identify(d)
        elif op == Op.RESUME:
            self._on_resume(d)
        elif self.session is None:
            self._fatal(CloseCode.NOT_AUTHENTICATED, "not authenticated")
        elif op == Op.SELECT_PROTOCOL:
            self._on_select_protocol(d)
        elif op == Op.SPEAKING:
            self._on_speaking(d)
        else:
            # 23/31 and anything unknown (12, 14–20, 99, ...) are tolerated, as Discord does.
            self.server.dave_hooks.on_json(self.session, op, d)

    def _on_heartbeat(self, d: Any) -> None:
        self._last_heartbeat = time.monotonic()
        if isinstance(d, dict):
            if self.session is not None and isinstance(d.get("seq_ack"), int):
                self.session.last_seq_ack = d["seq_ack"]
            ack: Any = {"t": d.get("t")}
        else:
            ack = d  # v < 8: bare integer nonce, echoed bare
        if not self.server.faults.drop_heartbeat_acks:
            self.send_unsequenced(Op.HEARTBEAT_ACK, ack)

    def _on_identify(self, d: Any) -> None:
        if self.session is not None:
            self._fatal(CloseCode.ALREADY_AUTHENTICATED, "already authenticated")
            return
        session = self._authenticate(d, ("server_id", "user_id", "session_id", "token"))
        if session is None:
            self.close(CloseCode.AUTHENTICATION_FAILED, "authentication failed")
            return
        max_dave = d.get("max_dave_protocol_version")
        if not isinstance(max_dave, int) or isinstance(max_dave, bool):
            max_dave = None
        if self.server.channel_dave(session.channel_id) and (max_dave is None or max_dave < 1):
            self._attach_log(session)
            self.close(CloseCode.E2EE_REQUIRED, "E2EE/DAVE protocol required")
            return
        self.server._identify(self, session, d, max_dave)

    def _authenticate(self, d: Any, fields: tuple[str, ...]) -> VoiceSession | None:
        if not isinstance(d, dict):
            return None
        session = self.server._sessions.get(str(d.get("session_id")))
        if session is None:
            return None
        creds = session.credentials
        expected = {
            "server_id": str(creds.guild_id),
            "user_id": str(creds.user_id),
            "session_id": creds.session_id,
        }
        for name in fields:
            if name == "token":
                token = d.get("token")
                if not isinstance(token, str) or not hmac.compare_digest(token, creds.token):
                    return None
            elif str(d.get(name)) != expected[name]:
                return None
        return session

    def _on_resume(self, d: Any) -> None:
        if self.session is not None:
            self._fatal(CloseCode.ALREADY_AUTHENTICATED, "already authenticated")
            return
        session = self._authenticate(d, ("server_id", "session_id", "token"))
        if session is None or not session.identified or session.ended:
            self.close(CloseCode.SESSION_NO_LONGER_VALID, "session no longer valid")
            return
        seq_ack = d.get("seq_ack")
        missed = session.missed_since(seq_ack if isinstance(seq_ack, int) else None)
        if missed is None:
            self._attach_log(session)
            self.close(CloseCode.SESSION_NO_LONGER_VALID, "session no longer valid (buffer passed seq_ack)")
            self.server._end_session(session)
            return
        self.server._resume(self, session)
        self.send_unsequenced(Op.RESUMED, None)
        for frame in missed:
            self.enqueue(frame)

    def _on_select_protocol(self, d: Any) -> None:
        if not isinstance(d, dict) or d.get("protocol") != "udp":
            self._fatal(CloseCode.UNKNOWN_PROTOCOL, "unknown protocol")
            return
        data = d.get("data")
        if not isinstance(data, dict):
            self._fatal(CloseCode.BAD_REQUEST, "select protocol without data")
            return
        mode = data.get("mode")
        if mode not in self.server.modes:
            self._fatal(CloseCode.UNKNOWN_ENCRYPTION_MODE, "unknown encryption mode")
            return
        address, port = data.get("address"), data.get("port")
        self.server._describe(self.session, mode, address, port)

    def _on_speaking(self, d: Any) -> None:
        if not isinstance(d, dict) or not isinstance(d.get("speaking"), int):
            self._fatal(CloseCode.DECODE_ERROR, "bad speaking payload")
            return
        self.server._speaking(self.session, d)


def new_media_session_id() -> str:
    return os.urandom(16).hex()
