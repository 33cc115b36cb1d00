"""LocalVoiceServer: a stand-in for one of Discord's voice servers, on loopback.

Owns the server object tests and ``telecom emulate`` use: issuing credentials, per-channel DAVE
settings, starting/stopping the websocket (ws or wss) and UDP sides (on the caller's loop or on its
own loop in a daemon thread), who is in which channel (op 11 / op 13), what happens when a socket
goes away (resume grace, leave), fault hooks, and thread-safe snapshots of what was received.

Wire details live in :mod:`~telecom.testing.gateway` (websocket), :mod:`~telecom.testing.udp`
(discovery + SFU) and :mod:`~telecom.testing.transport` (RTP + AEAD). Nothing here imports
telecom's own wire code: the server is the independent checker of it.

Threading: all protocol work runs on the server's loop. Every piece of shared state is guarded by
one re-entrant lock, so the query methods (``members``, ``record``, ``violations``, ...) return
consistent copies from any thread while the server runs in the background.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import ssl
import tempfile
import threading
import time
from collections import Counter
from typing import Any, Callable

from aiohttp import web

from telecom.errors import ConnectTimeout
from telecom.testing import certs
from telecom.testing.dave import DaveGroups
from telecom.testing.faults import Faults
from telecom.testing.gateway import GatewayConnection, Op, is_resumable_close, new_media_session_id
from telecom.testing.records import SPEAKING_GRACE_SECONDS, StreamRecord, Violation
from telecom.testing.session import VoiceCredentials, VoiceSession
from telecom.testing.transport import SUPPORTED_MODES, TransportCipher
from telecom.testing.udp import KernelStampedUdp, VoiceUdpProtocol

#: Ready's heartbeat_interval: deliberately wrong, as on Discord (clients must use Hello's).
BOGUS_READY_HEARTBEAT_INTERVAL = 1


class LocalVoiceServer:
    """A local voice server: gateway v8 over ws/wss, UDP discovery, rtpsize AEAD, an SFU relay.

    Example::

        server = LocalVoiceServer(heartbeat_interval=1.0)
        async with server:
            creds = server.create_session(guild_id=1, channel_id=2, user_id=3)
            ...  # connect a client to server.url with creds
            assert not server.violations()

    Times are in seconds. ``session_timeout`` (no heartbeat → close 4009) defaults to twice
    ``heartbeat_interval``; ``member_leave_grace`` is how long a session whose socket went away
    stays resumable before the member leaves (op 13 to the others). ``dave_transition_timeout``: how
    long a DAVE transition waits for every member's op 23 before op 22 goes out anyway.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls: bool = False,
        udp_port: int = 0,
        heartbeat_interval: float = 13.75,
        dave: bool = True,
        resume_buffer: int = 1000,
        speaking_required: bool = True,
        session_timeout: float | None = None,
        member_leave_grace: float = 15.0,
        modes: tuple[str, ...] | list[str] | None = None,
        cert_dir: str | None = None,
        dave_transition_timeout: float = 2.0,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._requested_udp_port = udp_port
        self.tls = tls
        self.heartbeat_interval = float(heartbeat_interval)
        self.session_timeout = float(session_timeout) if session_timeout else 2 * self.heartbeat_interval
        self.member_leave_grace = float(member_leave_grace)
        self.default_dave = dave
        self.resume_buffer = int(resume_buffer)
        self.speaking_required = speaking_required
        self.modes = tuple(modes) if modes is not None else SUPPORTED_MODES
        for mode in self.modes:
            if mode not in SUPPORTED_MODES:
                raise ValueError(f"unsupported transport mode {mode!r}")
        self.faults = Faults()
        # The MLS external sender and transition driver (telecom.testing.dave); a test may swap it.
        self.dave_hooks = DaveGroups(self, transition_timeout=dave_transition_timeout)

        self._lock = threading.RLock()
        self._sessions: dict[str, VoiceSession] = {}
        self._by_user: dict[int, VoiceSession] = {}
        self._by_ssrc: dict[int, VoiceSession] = {}
        self._channel_dave: dict[int, bool] = {}
        self._records: dict[int, StreamRecord] = {}
        self._violations: list[Violation] = []
        self._gateway_logs: dict[int, list[dict[str, Any]]] = {}
        self._connections: set[GatewayConnection] = set()
        self._counters: Counter[str] = Counter()

        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._certs: certs.CertificateFiles | None = None
        if tls:
            if cert_dir is None:
                self._tempdir = tempfile.TemporaryDirectory(prefix="telecom-voice-server-")
                cert_dir = self._tempdir.name
            os.makedirs(cert_dir, exist_ok=True)
            self._certs = certs.generate(cert_dir)

        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._udp: VoiceUdpProtocol | None = None
        self.port: int | None = None
        self.udp_port: int | None = None
        self._thread: threading.Thread | None = None

    # -- addresses ------------------------------------------------------------------------------

    @property
    def advertised_ip(self) -> str:
        """The IP in Ready (a wildcard bind is advertised as loopback)."""
        return "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host

    @property
    def endpoint(self) -> str:
        """``host:port`` with no scheme, as VOICE_SERVER_UPDATE carries it."""
        self._require_started()
        host = f"[{self.advertised_ip}]" if ":" in self.advertised_ip else self.advertised_ip
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{self.endpoint}/"

    @property
    def ca_file(self) -> str | None:
        return self._certs.ca_file if self._certs is not None else None

    def ssl_context(self) -> ssl.SSLContext:
        """A client-side context that verifies the server against :attr:`ca_file` (tls=True only)."""
        if self._certs is None:
            raise ValueError("the server was created with tls=False")
        return self._certs.client_context()

    def _require_started(self) -> None:
        if self.port is None:
            raise RuntimeError("the server is not started (use `async with server` or start_background())")

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("already started")
        self._loop = asyncio.get_running_loop()
        app = web.Application()
        app.router.add_get("/", self._handle_websocket)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._requested_port))
        site = web.SockSite(
            runner, sock, ssl_context=self._certs.server_context() if self._certs else None
        )
        await site.start()
        self.port = sock.getsockname()[1]
        udp_sock = socket.socket(family, socket.SOCK_DGRAM)
        udp_sock.bind((self.host, self._requested_udp_port))
        _grow_receive_buffer(udp_sock)
        protocol = VoiceUdpProtocol(self)
        KernelStampedUdp(self._loop, udp_sock, protocol)
        self._udp = protocol
        self.udp_port = udp_sock.getsockname()[1]
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        with self._lock:
            for session in self._sessions.values():
                if session.leave_handle is not None:
                    session.leave_handle.cancel()
                for _, timer in session.held.values():
                    timer.cancel()
                session.held.clear()
            connections = list(self._connections)
        for conn in connections:
            conn.close(1001, "server shutting down")
        await runner.cleanup()
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.close()
        self._udp = None

    async def __aenter__(self) -> LocalVoiceServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start_background(self, timeout: float = 10.0) -> None:
        """Run the server on its own loop in a daemon thread; return once it is listening."""
        if self._thread is not None:
            raise RuntimeError("already running in the background")
        started = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # handed to the caller below
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=main, name="telecom-local-voice-server", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise ConnectTimeout("local voice server did not start in time")
        if failure:
            self._thread = None
            raise failure[0]

    def stop_background(self, timeout: float = 10.0) -> None:
        """Stop the background server; return once its thread has ended."""
        thread, self._thread = self._thread, None
        if thread is None or self._loop is None:
            return
        loop = self._loop
        future = asyncio.run_coroutine_threadsafe(self.stop(), loop)
        try:
            future.result(timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)

    def _call_on_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` on the server loop: now if we are on it, else as soon as the loop can."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the server is not started")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn(*args)
        else:
            loop.call_soon_threadsafe(fn, *args)

    # -- configuration and credentials --------------------------------------------------------------

    def configure_channel(self, channel_id: int, *, dave: bool | None = None) -> None:
        """Per-channel settings. ``dave=None`` goes back to the server default."""
        with self._lock:
            if dave is None:
                self._channel_dave.pop(int(channel_id), None)
            else:
                self._channel_dave[int(channel_id)] = bool(dave)

    def channel_dave(self, channel_id: int) -> bool:
        with self._lock:
            return self._channel_dave.get(int(channel_id), self.default_dave)

    def create_session(self, guild_id: int, channel_id: int, user_id: int,
                       session_id: str | None = None) -> VoiceCredentials:
        """Issue credentials, as the main gateway's VOICE_STATE/SERVER_UPDATE pair would.

        ``session_id``: the main gateway's session id to reuse. On Discord it belongs to the main
        gateway session, so a move to another voice server keeps it and only the endpoint and token
        change; pass the first server's id here to stage such a move.
        """
        self._require_started()
        creds = VoiceCredentials(
            endpoint=self.endpoint,
            token=secrets.token_hex(16),
            session_id=session_id or secrets.token_hex(16),
            guild_id=int(guild_id),
            channel_id=int(channel_id),
            user_id=int(user_id),
        )
        with self._lock:
            self._sessions[creds.session_id] = VoiceSession(creds, self.resume_buffer)
        return creds

    # -- queries (thread-safe snapshots) ---------------------------------------------------------

    def members(self, channel_id: int) -> list[int]:
        """User ids identified in the channel (including those whose socket is in resume grace)."""
        with self._lock:
            return [
                s.user_id
                for s in self._sessions.values()
                if s.channel_id == channel_id and s.identified and not s.ended
            ]

    def ssrc_of(self, user_id: int) -> int | None:
        with self._lock:
            session = self._by_user.get(user_id)
            return session.ssrc if session is not None and not session.ended else None

    def session_of(self, user_id: int) -> VoiceSession | None:
        """The user's current session object (live state; read under care, for tests and hooks)."""
        with self._lock:
            return self._by_user.get(user_id)

    def record(self, user_id: int) -> StreamRecord:
        """A copy of everything received on UDP from the user (empty if nothing yet)."""
        with self._lock:
            record = self._records.get(user_id)
            return record.copy() if record is not None else StreamRecord(user_id=user_id)

    def violations(self, user_id: int | None = None) -> list[Violation]:
        with self._lock:
            self._commit_due_speaking_checks()
            return [v for v in self._violations if user_id is None or v.user_id == user_id]

    def gateway_log(self, user_id: int) -> list[dict[str, Any]]:
        """Every message received from the user's sockets (JSON as parsed; binary as
        ``{"op": opcode, "binary": payload}``), in arrival order."""
        with self._lock:
            return [dict(m) for m in self._gateway_logs.get(user_id, [])]

    def stats(self) -> dict[str, int]:
        """Counters: rtp_in, rtcp_in, keepalives, discovery, relayed, relay_lost, ..."""
        with self._lock:
            return dict(self._counters)

    async def wait_for(self, predicate: Callable[[], Any], timeout: float, interval: float = 0.01) -> Any:
        """Poll ``predicate()`` until it returns something truthy; return it or raise ConnectTimeout."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() >= deadline:
                raise ConnectTimeout(f"condition not met within {timeout} s")
            await asyncio.sleep(interval)

    def wait_for_sync(self, predicate: Callable[[], Any], timeout: float, interval: float = 0.01) -> Any:
        """Blocking twin of :meth:`wait_for`, for threads (the server must run in the background)."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() >= deadline:
                raise ConnectTimeout(f"condition not met within {timeout} s")
            time.sleep(interval)

    # -- fault hooks ---------------------------------------------------------------------------

    def close_client(self, user_id: int, code: int, reason: str = "") -> None:
        """Close the user's websocket with ``code``. 4015 and codes < 4000 (but 1000) leave the
        session resumable; any other code ends it (the member leaves)."""
        self._call_on_loop(self._close_client, user_id, int(code), reason)

    def drop_client(self, user_id: int) -> None:
        """Abort the user's TCP connection (no close frame); the session stays resumable."""
        self._call_on_loop(self._drop_client, user_id)

    def _close_client(self, user_id: int, code: int, reason: str) -> None:
        with self._lock:
            session = self._by_user.get(user_id)
            if session is None or session.ended:
                return
            if session.connection is not None:
                session.connection.close(code, reason)
            if not is_resumable_close(code):
                self._end_session(session)

    def _drop_client(self, user_id: int) -> None:
        with self._lock:
            session = self._by_user.get(user_id)
            if session is not None and session.connection is not None:
                session.connection.drop()

    # -- internals used by gateway.py / udp.py (called with the lock held) ---------------------------

    async def _handle_websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=True, heartbeat=None, compress=True)
        await ws.prepare(request)
        conn = GatewayConnection(self, request, ws)
        with self._lock:
            self._connections.add(conn)
        try:
            await conn.run()
        finally:
            with self._lock:
                self._connections.discard(conn)
        return ws

    @property
    def heartbeat_interval_ms(self) -> float:
        ms = self.heartbeat_interval * 1000
        return int(ms) if ms == int(ms) else ms

    def _record_for(self, session: VoiceSession) -> StreamRecord:
        record = self._records.get(session.user_id)
        if record is None:
            record = self._records[session.user_id] = StreamRecord(user_id=session.user_id)
        record.ssrc = session.ssrc
        return record

    def _violation(
        self, kind: str, session: VoiceSession | None, detail: str, at: float, *, ssrc: int | None = None
    ) -> None:
        self._violations.append(
            Violation(
                kind=kind,
                user_id=session.user_id if session is not None else None,
                ssrc=session.ssrc if session is not None else ssrc,
                detail=detail,
                at=at,
            )
        )

    def _schedule_speaking_check(self, session: VoiceSession) -> None:
        assert self._loop is not None
        self._loop.call_later(SPEAKING_GRACE_SECONDS + 0.01, self._speaking_check_due)

    def _speaking_check_due(self) -> None:
        with self._lock:
            self._commit_due_speaking_checks()

    def _commit_due_speaking_checks(self) -> None:
        if not self.speaking_required:
            return
        now = time.monotonic()
        for session in self._sessions.values():
            due = session.validator.due_audio_before_speaking(now)
            if due is not None:
                arrival, sequence = due
                self._violation(
                    "audio_before_speaking",
                    session,
                    f"audio (sequence {sequence}) before any Speaking with a non-zero mask",
                    arrival,
                )

    def _media_members(self, channel_id: int) -> list[VoiceSession]:
        """Members past Session Description: the ones that get op 11/13/5 and relayed audio."""
        return [
            s for s in self._sessions.values() if s.channel_id == channel_id and s.described and not s.ended
        ]

    def _new_ssrc(self) -> int:
        while True:
            ssrc = secrets.randbits(32)
            if ssrc and ssrc not in self._by_ssrc:
                return ssrc

    def _identify(
        self, conn: GatewayConnection, session: VoiceSession, d: dict[str, Any], max_dave: int | None
    ) -> None:
        previous = session.connection
        if session.identified and not session.ended:
            # A fresh Identify on a live session replaces it: the old membership ends.
            self._end_session(session)
        if previous is not None and previous is not conn:
            previous.close(4014, "session replaced by a new Identify")
        if session.ssrc is not None:
            self._by_ssrc.pop(session.ssrc, None)
        session.reset()
        session.identified = True
        session.max_dave_protocol_version = max_dave
        session.ssrc = self._new_ssrc()
        session.connection = conn
        conn.session = session
        conn._attach_log()
        self._by_ssrc[session.ssrc] = session
        self._by_user[session.user_id] = session
        self._record_for(session)
        now = time.monotonic()
        identity_fields = ("server_id", "user_id", "session_id", "token")
        wrong_types = [k for k in identity_fields if not isinstance(d.get(k), str)]
        if wrong_types:
            self._violation("identify_fields", session, f"not strings: {', '.join(wrong_types)}", now)
        if "max_dave_protocol_version" not in d:
            self._violation("identify_fields", session, "max_dave_protocol_version missing", now)
        self.dave_hooks.on_identify(session, d)
        session.send(
            Op.READY,
            {
                "ssrc": session.ssrc,
                "ip": self.advertised_ip,
                "port": self.udp_port,
                "modes": list(self.modes),
                "heartbeat_interval": BOGUS_READY_HEARTBEAT_INTERVAL,
                "streams": [],
                "experiments": [],
            },
        )

    def _resume(self, conn: GatewayConnection, session: VoiceSession) -> None:
        previous = session.connection
        if previous is not None and previous is not conn:
            previous.close(1001, "session resumed on another socket")
        if session.leave_handle is not None:
            session.leave_handle.cancel()
            session.leave_handle = None
        session.connection = conn
        conn.session = session
        conn._attach_log()

    def _describe(self, session: VoiceSession, mode: str, address: Any, port: Any) -> None:
        key = os.urandom(32)
        session.mode = mode
        session.secret_key = key
        session.cipher = TransportCipher(mode, key)
        session.validator.reset()  # a new key: nonce/sequence expectations start over
        channel_dave = self.channel_dave(session.channel_id)
        max_dave = session.max_dave_protocol_version or 0
        session.dave_protocol_version = 1 if channel_dave and max_dave >= 1 else 0
        session.media_session_id = new_media_session_id()
        if session.udp_address is None and isinstance(address, str) and isinstance(port, int):
            session.udp_address = (address, port)
        session.send(
            Op.SESSION_DESCRIPTION,
            {
                "mode": mode,
                "secret_key": list(key),
                "dave_protocol_version": session.dave_protocol_version,
                "audio_codec": "opus",
                "video_codec": "H264",
                "media_session_id": session.media_session_id,
            },
        )
        if not session.described:
            others = [s for s in self._media_members(session.channel_id) if s is not session]
            session.described = True
            for other in others:
                other.send(Op.CLIENTS_CONNECT, {"user_ids": [str(session.user_id)]})
            if others:
                session.send(Op.CLIENTS_CONNECT, {"user_ids": [str(o.user_id) for o in others]})
                # So the newcomer can map SSRC → user for members who are already talking.
                for other in others:
                    if other.last_speaking is not None:
                        session.send(Op.SPEAKING, dict(other.last_speaking))
        self.dave_hooks.on_session_description(session)

    def _speaking(self, session: VoiceSession, d: dict[str, Any]) -> None:
        arrival = time.monotonic()
        flags = d["speaking"]
        self._record_for(session).speaking_events.append((arrival, flags))
        if d.get("ssrc") != session.ssrc:
            self._violation(
                "speaking_ssrc", session,
                f"Speaking with ssrc {d.get('ssrc')!r}, own is {session.ssrc}", arrival,
            )
        session.speaking = flags
        session.validator.on_speaking(flags, arrival)
        message = {"user_id": str(session.user_id), "ssrc": session.ssrc, "speaking": flags}
        session.last_speaking = message
        if session.described:
            for other in self._media_members(session.channel_id):
                if other is not session:
                    other.send(Op.SPEAKING, dict(message))

    def _connection_lost(self, conn: GatewayConnection, client_code: int | None) -> None:
        session = conn.session
        if session is None or session.connection is not conn:
            return
        session.connection = None
        if session.ended:
            return
        if conn.server_close_code is not None:
            resumable = is_resumable_close(conn.server_close_code)
        else:
            # The client closing with 1000/1001 means it is leaving (see gateway.py).
            resumable = client_code not in (1000, 1001)
        if not resumable:
            self._end_session(session)
            return
        assert self._loop is not None
        session.leave_handle = self._loop.call_later(self.member_leave_grace, self._grace_expired, session)

    def _grace_expired(self, session: VoiceSession) -> None:
        with self._lock:
            session.leave_handle = None
            if session.connection is None and not session.ended:
                self._end_session(session)

    def _end_session(self, session: VoiceSession) -> None:
        """The member leaves: the session is no longer resumable; the others get op 13."""
        if session.ended:
            return
        session.ended = True
        if session.leave_handle is not None:
            session.leave_handle.cancel()
            session.leave_handle = None
        for _, timer in session.held.values():
            timer.cancel()
        session.held.clear()
        if session.ssrc is not None and self._by_ssrc.get(session.ssrc) is session:
            del self._by_ssrc[session.ssrc]
        if session.described:
            session.described = False
            for other in self._media_members(session.channel_id):
                other.send(Op.CLIENT_DISCONNECT, {"user_id": str(session.user_id)})
            self.dave_hooks.on_member_leave(session)


UDP_RECEIVE_BUFFER = 16 * 1024 * 1024


def _grow_receive_buffer(sock: Any) -> None:
    """Room for bursts: hundreds of clients send a packet each per 20 ms while this Python server may
    be descheduled for tens of ms on a busy machine; the default ~200 KiB buffer overflows then and the
    kernel drops packets the clients did send. SO_RCVBUFFORCE passes rmem_max when root."""
    if sock is None:
        return
    for option in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
        if option is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, UDP_RECEIVE_BUFFER)
            return
        except OSError:
            continue
