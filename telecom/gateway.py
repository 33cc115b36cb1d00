"""The client side of Discord's voice gateway v8: handshake, heartbeats, ``seq_ack`` and resume.

This module owns one voice websocket's life on the io loop: Identify → Hello/Ready → UDP socket and
IP discovery → Select Protocol → Session Description, then heartbeats, ``seq`` tracking, resuming
after drops (op 7 with ``seq_ack``, keeping the UDP socket, SSRC and key), a full reconnect when a
resume is refused, and the terminal close codes. It reports to a :class:`GatewayListener` (the
``Client``), and it must not touch media: RTP, encryption and DAVE state live elsewhere; the DAVE
opcodes (21–31) are only passed through.

Ownership of the UDP socket: the gateway opens it and hands it over in :class:`SessionInfo`. It
closes the previous socket right after ``on_session`` returns for a replacement (full reconnect),
and the current one right after ``on_closed`` returns. A listener must stop using ``info.sock``
by then.

Close codes 4014 and 4022 end the gateway (``on_closed``); waiting for a VOICE_SERVER_UPDATE that
may follow a move or a voice-server change, and connecting afresh with it, is the ``Client``'s job
(a later issue).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
import re
import socket
import ssl as _ssl
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import aiohttp

from telecom.errors import ClientClosed, ConfigurationError, ConnectTimeout, GatewayError, TelecomError
from telecom.protocol import DAVE_OPCODES, CloseCode, Opcode, close_action, describe_close_code
from telecom.udp import ip_discovery, open_voice_socket, send_keepalives

__all__ = [
    "SUPPORTED_MODES",
    "GatewayConfig",
    "GatewayListener",
    "SessionInfo",
    "VoiceGateway",
    "choose_mode",
    "voice_gateway_url",
]

log = logging.getLogger("telecom.gateway")
log.addHandler(logging.NullHandler())

#: Transport encryption modes we implement, most preferred first (spec §1.5: AES-GCM when offered).
SUPPORTED_MODES = ("aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize")

#: The close code we send when we drop a socket in order to resume (anything but 1000/1001, which
#: would tell the server we are leaving for good).
_RESUME_CLOSE_CODE = 4000

_BINARY_PREFIX = struct.Struct(">HB")  # server→client binary frames: u16 seq, u8 opcode


@dataclass
class GatewayConfig:
    """Timeouts and limits of one :class:`VoiceGateway`."""

    connect_timeout: float = 10.0  # per websocket connect and per handshake step
    ip_discovery_timeout: float = 2.0  # per try
    ip_discovery_retries: int = 3  # tries in all
    max_missed_heartbeat_acks: int = 3  # un-acked heartbeats in a row, then the socket is dead → resume
    resume_attempts: int = 5  # failed resumes before a full reconnect; failed reconnects before giving up
    backoff_base: float = 0.5
    backoff_max: float = 10.0
    heartbeat_interval: float | None = None  # seconds; None = use Hello's (tests shorten it)
    max_dave_protocol_version: int = 1  # what Identify announces; 0 gets 4017 from Discord since 2026-03
    compress: int = 0  # aiohttp websocket compress (15 = permessage-deflate)
    udp_keepalive_interval: float | None = 5.0  # seconds between 8-byte UDP keepalives; None = off
    # After 4014/4022 (moved, region change, call ended) the Client waits this long for a new
    # VOICE_SERVER_UPDATE (set_server_info) before it reports the disconnect.
    server_update_wait: float = 5.0


_HOST_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


def voice_gateway_url(endpoint: str) -> str:
    """The websocket URL for a VOICE_SERVER_UPDATE ``endpoint``.

    ``"host:port"`` (what Discord sends) becomes ``"wss://host:port/?v=8"``; a bare ``"host"`` uses
    the default wss port; an explicit ``ws://`` or ``wss://`` URL is kept, with ``v=8`` added to its
    query when it names no version. Anything else raises :class:`~telecom.errors.ConfigurationError`.

    >>> voice_gateway_url("sweetwater-1234.discord.media:2048")
    'wss://sweetwater-1234.discord.media:2048/?v=8'
    """
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise ConfigurationError(f"voice endpoint must be a non-empty string, got {endpoint!r}")
    text = endpoint.strip()
    lowered = text.lower()
    explicit = lowered.startswith(("ws://", "wss://"))
    if "://" in text and not explicit:
        raise ConfigurationError(
            f"voice endpoint must be host:port or a ws:// or wss:// URL, got {endpoint!r}"
        )
    try:
        parts = urlsplit(text if explicit else "wss://" + text)
        port = parts.port  # raises ValueError on a non-numeric or out-of-range port
    except ValueError as exc:
        raise ConfigurationError(f"invalid voice endpoint {endpoint!r}: {exc}") from None
    host = parts.hostname
    if not host or parts.username is not None or parts.password is not None or parts.fragment:
        raise ConfigurationError(f"invalid voice endpoint {endpoint!r}")
    if not _valid_host(host):
        raise ConfigurationError(f"invalid host in voice endpoint {endpoint!r}")
    if port == 0:
        raise ConfigurationError(f"invalid port in voice endpoint {endpoint!r}")
    if not explicit and (parts.path not in ("", "/") or parts.query):
        raise ConfigurationError(f"voice endpoint must be host[:port], got {endpoint!r}")
    query = parts.query
    if "v" not in {name for name, _ in parse_qsl(query, keep_blank_values=True)}:
        query = f"{query}&v=8" if query else "v=8"
    return urlunsplit((parts.scheme.lower(), parts.netloc, parts.path or "/", query, ""))


def _valid_host(host: str) -> bool:
    if ":" in host:  # an IPv6 literal (urlsplit already removed the brackets)
        try:
            socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
        except OSError:
            return False
        return True
    labels = host.rstrip(".").split(".")
    return len(host) <= 253 and all(_HOST_LABEL.match(label) for label in labels)


def choose_mode(modes: Any) -> str:
    """The transport encryption mode to select from Ready's ``modes``: AES-GCM if offered, else XChaCha.

    Raises :class:`~telecom.errors.GatewayError` when the server offers neither.
    """
    offered = [m for m in modes if isinstance(m, str)] if isinstance(modes, (list, tuple)) else []
    for mode in SUPPORTED_MODES:
        if mode in offered:
            return mode
    raise GatewayError(f"the voice server offers no encryption mode we implement: {offered!r}")


@dataclass(frozen=True)
class SessionInfo:
    """What the media engine needs once the handshake is done (Ready + IP discovery + op 4)."""

    ssrc: int
    ip: str  # the voice server's UDP address (Ready)
    port: int
    mode: str  # the transport encryption mode the server confirmed
    secret_key: bytes = field(repr=False)  # 32 bytes; never in reprs or logs
    dave_protocol_version: int
    sock: socket.socket  # connect()ed to (ip, port), non-blocking; owned by the gateway
    external_ip: str  # where the voice server sees us (IP discovery)
    external_port: int


class GatewayListener(Protocol):
    """What the gateway reports; implemented by the ``Client``. Every call comes on the io loop.

    Callbacks must not block. An exception raised by one is passed to the loop's exception handler
    and the gateway carries on.
    """

    def on_session(self, info: SessionInfo) -> None:
        """The handshake is complete (also after a full reconnect, with a new socket and key)."""

    def on_resumed(self) -> None:
        """A resume succeeded: the previous :class:`SessionInfo` is still valid."""

    def on_speaking(self, user_id: int, ssrc: int, flags: int) -> None:
        """op 5 from the server: ``user_id`` sends on ``ssrc``."""

    def on_clients_connect(self, user_ids: list[int]) -> None:
        """op 11: these users are in the media session."""

    def on_client_disconnect(self, user_id: int) -> None:
        """op 13: this user left."""

    def on_dave_message(self, op: int, payload: object) -> None:
        """ops 21–31: a JSON ``d`` (dict) or a binary frame's payload (bytes, sequence prefix removed)."""

    def on_state(self, state: str, detail: str = "") -> None:
        """"connecting", "identifying", "ready", "resuming", "reconnecting" or "closed"."""

    def on_closed(self, code: int | None, error: BaseException | None) -> None:
        """Terminal: the gateway will not reconnect. ``error`` is None after :meth:`VoiceGateway.close`."""


class _ConnectionEnded(Exception):
    """The websocket ended while a handshake step was waiting."""


class _Fatal(Exception):
    """A handshake error that retrying cannot fix (e.g. no common encryption mode)."""

    def __init__(self, error: TelecomError) -> None:
        super().__init__(str(error))
        self.error = error


class _Connection:
    """State of one websocket connection (one attempt)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, resuming: bool) -> None:
        loop = asyncio.get_running_loop()
        self.ws = ws
        self.resuming = resuming
        self.ready: asyncio.Future[Any] = loop.create_future()
        self.session_description: asyncio.Future[Any] = loop.create_future()
        self.resumed: asyncio.Future[None] = loop.create_future()
        self.heartbeat_task: asyncio.Task[None] | None = None
        self.sender_task: asyncio.Task[None] | None = None
        self.close_code: int | None = None  # from the server's close frame; None = no close frame
        self.close_reason = ""
        self.error: BaseException | None = None
        self.zombie = False  # we closed it because heartbeat ACKs stopped
        self.established = False  # reached ready (on_session or on_resumed)
        self.unacked = 0
        self.sent_beats: dict[int, float] = {}
        self.resume_seq_ack = -1
        self.held_events: list[tuple[str, tuple[Any, ...]]] | None = None if resuming else []


@dataclass
class _Outcome:
    code: int | None
    error: BaseException | None
    established: bool
    resuming: bool
    zombie: bool = False
    fatal: bool = False


class VoiceGateway:
    """One voice gateway v8 session, driven by :meth:`run` on the io loop.

    >>> gateway = VoiceGateway(endpoint=endpoint, server_id=guild_id, user_id=user_id,
    ...                        session_id=session_id, token=token, listener=client)
    >>> task = asyncio.create_task(gateway.run())     # on_session(info) follows
    >>> await gateway.speaking(SpeakingFlags.MICROPHONE)
    >>> await gateway.close()
    """

    def __init__(
        self,
        *,
        endpoint: str,
        server_id: int | str,
        user_id: int | str,
        session_id: str,
        token: str,
        listener: GatewayListener,
        ssl: _ssl.SSLContext | bool | None = None,
        config: GatewayConfig | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = voice_gateway_url(endpoint)
        self.server_id = str(server_id)
        self.user_id = str(user_id)
        self._session_id = str(session_id)
        self._token = str(token)
        self._listener = listener
        self._ssl: _ssl.SSLContext | bool = True if ssl is None else ssl
        self.config = config or GatewayConfig()
        self._http = session
        self._own_http = session is None

        self.last_seq = -1
        self.ssrc: int | None = None
        self.state = "idle"
        self.latency: float | None = None  # heartbeat round trip, seconds
        self.session_info: SessionInfo | None = None
        self.close_code: int | None = None
        self.close_error: BaseException | None = None

        self._loop: asyncio.AbstractEventLoop | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[aiohttp.ClientWebSocketResponse] | None = None
        self._closing = False
        self._closed = False
        self._close_request_code = 1000
        self._wakeup: asyncio.Event | None = None
        self._outbox: collections.deque[tuple[str | bytes, asyncio.Future[None] | None]] = collections.deque()
        self._outbox_ready: asyncio.Event | None = None
        self._keepalive_task: asyncio.Task[None] | None = None
        self._drops: collections.deque[float] = collections.deque(maxlen=16)
        self._beat_t = 0

    def __repr__(self) -> str:
        return f"<VoiceGateway {self.url} state={self.state} ssrc={self.ssrc} last_seq={self.last_seq}>"

    # ------------------------------------------------------------------ public API

    async def run(self) -> None:
        """Connect and keep the session alive until :meth:`close` or a terminal close code.

        Always returns normally; the end is reported through ``listener.on_closed`` (and kept in
        :attr:`close_code` / :attr:`close_error`).
        """
        if self._run_task is not None:
            raise RuntimeError("VoiceGateway.run() can only be called once")
        self._run_task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._outbox_ready = asyncio.Event()
        code: int | None = None
        error: BaseException | None = None
        try:
            if self._http is None:
                self._http = aiohttp.ClientSession()
            code, error = await self._main()
        except asyncio.CancelledError:
            code, error = None, ClientClosed("the voice gateway task was cancelled")
            raise
        except Exception as exc:  # a bug of ours: report it rather than die silently
            log.exception("voice gateway failed")
            code, error = None, exc
        finally:
            await self._finish(code, error)

    def send_speaking(self, flags: int) -> None:
        """Queue op 5 ``{"speaking": flags, "delay": 0, "ssrc": own}``. io loop only.

        Needs the SSRC (after ``on_session``); queued frames wait through a resume and are sent in order.
        """
        self._enqueue(self._speaking_frame(flags), None)

    async def speaking(self, flags: int) -> None:
        """Send op 5 and wait until it has been written to the websocket."""
        assert self._loop is not None, "run() has not started"
        done = self._loop.create_future()
        self._enqueue(self._speaking_frame(flags), done)
        await done

    def send_json(self, op: int, d: Any) -> None:
        """Queue a JSON message (for DAVE ops 23, 31); sent once the session is ready. io loop only."""
        self._enqueue(json.dumps({"op": int(op), "d": d}, separators=(",", ":")), None)

    def send_binary(self, op: int, payload: bytes) -> None:
        """Queue a client→server binary frame ``u8 op ‖ payload`` (DAVE ops 26, 28). io loop only."""
        self._enqueue(bytes((int(op),)) + bytes(payload), None)

    async def close(self, code: int = 1000) -> None:
        """Close the websocket with ``code`` and stop; ``run()`` returns and ``on_closed`` fires."""
        if self._closed or self._closing:
            if self._run_task is not None and self._run_task is not asyncio.current_task():
                await asyncio.wait({self._run_task})
            return
        self._closing = True
        self._close_request_code = code
        if self._wakeup is not None:
            self._wakeup.set()
        if self._outbox_ready is not None:
            self._outbox_ready.set()
        conn = self._conn
        if self._connecting is not None:
            self._connecting.cancel()
        if conn is not None and not conn.ws.closed:
            await self._close_ws(conn.ws, code, b"")
        if self._run_task is None:
            self._closed = True
            self._set_state("closed", "closed before run()")
        elif self._run_task is not asyncio.current_task():
            await asyncio.wait({self._run_task})

    # ------------------------------------------------------------------ the session loop

    async def _main(self) -> tuple[int | None, BaseException | None]:
        cfg = self.config
        resume = False
        can_resume = True  # False once resuming was refused or failed too often, until a fresh session
        resume_failures = 0
        reconnect_failures = 0
        code_reconnects = 0  # full reconnects caused by a "bug" close code since the last success
        failures = 0  # consecutive attempts that did not get ready, for the backoff
        while not self._closing:
            delay = self._backoff(failures)
            if delay > 0:
                self._set_state("reconnecting", f"next attempt in {delay:.2f} s")
                if await self._sleep(delay):
                    break
            outcome = await self._attempt(resume)
            if self._closing:
                break
            if outcome.fatal:
                return outcome.code, outcome.error
            if outcome.established:
                resume_failures = reconnect_failures = code_reconnects = failures = 0
                can_resume = True
                self._drops.append(time.monotonic())

            action = "resume" if outcome.zombie else close_action(outcome.code)
            refused = outcome.code == CloseCode.SESSION_NO_LONGER_VALID and outcome.resuming
            if refused:
                action = "reconnect"  # the resume was refused: identify afresh (same credentials), at once
            log.info(
                "voice gateway connection ended: %s%s → %s",
                "heartbeat ACKs missed" if outcome.zombie else describe_close_code(outcome.code),
                f" ({outcome.error})" if outcome.error else "",
                action,
            )
            if action in ("wait_server_update", "new_session", "fatal"):
                return outcome.code, GatewayError(
                    f"the voice gateway closed the connection with {describe_close_code(outcome.code)}",
                    code=outcome.code,
                )
            if action == "reconnect":
                if outcome.code is not None and outcome.code != CloseCode.SESSION_NO_LONGER_VALID:
                    code_reconnects += 1
                    if code_reconnects > 1:
                        return outcome.code, GatewayError(
                            f"the voice gateway closed with {describe_close_code(outcome.code)} again "
                            "after a fresh session; giving up",
                            code=outcome.code,
                        )
                resume = can_resume = False
            else:
                resume = can_resume and self.session_info is not None

            if refused:
                pass
            elif not outcome.established:
                failures += 1
                if outcome.resuming:
                    resume_failures += 1
                    if resume_failures >= cfg.resume_attempts:
                        log.info("resume failed %d times; connecting afresh", resume_failures)
                        resume = can_resume = False
                        resume_failures = 0
                else:
                    reconnect_failures += 1
                    if reconnect_failures >= cfg.resume_attempts:
                        error = outcome.error or GatewayError(
                            f"the voice gateway closed with {describe_close_code(outcome.code)}",
                            code=outcome.code,
                        )
                        if not isinstance(error, TelecomError):
                            error = GatewayError(
                                f"could not connect to the voice gateway: {error}", code=outcome.code
                            )
                        return outcome.code, error
            else:
                failures = 0
        return self._close_request_code, None

    def _backoff(self, failures: int) -> float:
        """Seconds to wait before the next attempt: none for the first retry after a working session."""
        cfg = self.config
        if failures == 0:
            # A session that keeps dropping right after coming up must not turn into a busy loop.
            now = time.monotonic()
            recent = sum(1 for t in self._drops if now - t < 30.0)
            if recent < 3:
                return 0.0
            failures = recent - 2
        delay = min(cfg.backoff_max, cfg.backoff_base * (2 ** (failures - 1)))
        return delay * random.uniform(0.8, 1.0)

    async def _sleep(self, delay: float) -> bool:
        """Sleep ``delay`` seconds; True if :meth:`close` was called meanwhile."""
        assert self._wakeup is not None
        try:
            await asyncio.wait_for(self._wakeup.wait(), delay)
        except asyncio.TimeoutError:
            pass
        return self._closing

    async def _attempt(self, resume: bool) -> _Outcome:
        cfg = self.config
        self._set_state("resuming" if resume else "connecting", self.url)
        assert self._http is not None
        connecting = asyncio.ensure_future(asyncio.wait_for(
            self._http.ws_connect(
                self.url,
                ssl=self._ssl,
                compress=cfg.compress,
                autoping=True,
                heartbeat=None,  # Discord's heartbeat (op 3) is ours to send, not websocket pings
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=min(cfg.connect_timeout, 5.0)),
            ),
            cfg.connect_timeout,
        ))
        self._connecting = connecting  # close() cancels it
        try:
            await asyncio.wait({connecting})
        except asyncio.CancelledError:
            connecting.cancel()
            raise
        finally:
            self._connecting = None
        if connecting.cancelled():
            return _Outcome(None, None, False, resume)
        try:
            ws = connecting.result()
        except asyncio.TimeoutError:
            timeout = ConnectTimeout(f"connecting to {self.url} took over {cfg.connect_timeout:g} s")
            return _Outcome(None, timeout, False, resume)
        except (aiohttp.ClientError, OSError) as exc:
            error = GatewayError(f"could not connect to {self.url}: {exc}")
            error.__cause__ = exc
            return _Outcome(None, error, False, resume)

        conn = _Connection(ws, resume)
        self._conn = conn
        if self._closing:
            await self._close_ws(ws, self._close_request_code, b"")
            return _Outcome(None, None, False, resume)
        reader = asyncio.ensure_future(self._read_loop(conn))
        error: BaseException | None = None
        fatal = False
        try:
            if resume:
                await self._resume(conn, reader)
            else:
                await self._identify(conn, reader)
            conn.sender_task = asyncio.ensure_future(self._send_loop(conn))
            await asyncio.wait({reader})
        except _ConnectionEnded:
            pass
        except _Fatal as exc:
            error, fatal = exc.error, True
        except (TelecomError, OSError, aiohttp.ClientError, ValueError, KeyError, TypeError) as exc:
            # A handshake step failed (timeout, bad Ready/Session Description, discovery): retry.
            error = exc if isinstance(exc, TelecomError) else GatewayError(f"voice handshake failed: {exc!r}")
            log.info("voice handshake failed: %s", error)
        finally:
            for task in (conn.heartbeat_task, conn.sender_task):
                if task is not None:
                    task.cancel()
            if not reader.done():
                # 1000 tells the server we are leaving; anything else keeps the session resumable.
                code = self._close_request_code if self._closing else 1000 if fatal else _RESUME_CLOSE_CODE
                await self._close_ws(ws, code, b"")
                await asyncio.wait({reader}, timeout=1.0)
                reader.cancel()
            self._conn = None
        if reader.done() and not reader.cancelled() and reader.exception() is not None:
            log.error("voice gateway reader failed", exc_info=reader.exception())
            conn.error = conn.error or reader.exception()
        if conn.error is not None and error is None:
            error = GatewayError(f"voice websocket error: {conn.error}")
            error.__cause__ = conn.error
        return _Outcome(conn.close_code, error, conn.established, resume, conn.zombie, fatal)

    async def _identify(self, conn: _Connection, reader: asyncio.Future[None]) -> None:
        cfg = self.config
        self._set_state("identifying")
        self.last_seq = -1  # a new session numbers its messages afresh
        await conn.ws.send_str(self._frame(Opcode.IDENTIFY, {
            "server_id": self.server_id,
            "user_id": self.user_id,
            "session_id": self._session_id,
            "token": self._token,
            "max_dave_protocol_version": cfg.max_dave_protocol_version,
        }))
        ready = await self._step(conn.ready, reader, "Ready (op 2)", cfg.connect_timeout)
        ssrc, ip, port = int(ready["ssrc"]), str(ready["ip"]), int(ready["port"])
        try:
            mode = choose_mode(ready.get("modes"))
        except GatewayError as exc:
            raise _Fatal(exc) from None
        self.ssrc = ssrc
        log.debug("Ready: ssrc=%d udp=%s:%d modes=%s", ssrc, ip, port, ready.get("modes"))

        sock = open_voice_socket(ip, port)
        try:
            assert self._loop is not None
            external_ip, external_port = await self._step(
                ip_discovery(self._loop, sock, ssrc, timeout=cfg.ip_discovery_timeout,
                             retries=cfg.ip_discovery_retries),
                reader, "IP discovery", None,
            )
            log.debug("IP discovery: we are %s:%d", external_ip, external_port)
            await conn.ws.send_str(self._frame(Opcode.SELECT_PROTOCOL, {
                "protocol": "udp",
                "data": {"address": external_ip, "port": external_port, "mode": mode},
            }))
            description = await self._step(conn.session_description, reader, "Session Description (op 4)",
                                            cfg.connect_timeout)
            secret_key = bytes(description["secret_key"])
            if len(secret_key) != 32:
                raise GatewayError(f"Session Description carries a {len(secret_key)}-byte key, expected 32")
            info = SessionInfo(
                ssrc=ssrc,
                ip=ip,
                port=port,
                mode=str(description.get("mode") or mode),
                secret_key=secret_key,
                dave_protocol_version=int(description.get("dave_protocol_version") or 0),
                sock=sock,
                external_ip=external_ip,
                external_port=external_port,
            )
        except BaseException:
            sock.close()
            raise
        log.debug("Session Description: mode=%s dave_protocol_version=%d",
                  info.mode, info.dave_protocol_version)

        previous, self.session_info = self.session_info, info
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
            self._keepalive_task = None
        if previous is not None:
            # Queued DAVE messages belong to the old session's MLS group: never send them to the new one.
            self._drop_outbox(GatewayError("the voice session was replaced by a new one"))
        conn.established = True
        self._set_state("ready", f"ssrc {ssrc}, {info.mode}")
        self._notify("on_session", info)
        held, conn.held_events = conn.held_events or [], None
        for name, args in held:
            self._notify(name, *args)
        if previous is not None:
            previous.sock.close()
        if cfg.udp_keepalive_interval:
            self._keepalive_task = asyncio.ensure_future(send_keepalives(sock, cfg.udp_keepalive_interval))

    async def _resume(self, conn: _Connection, reader: asyncio.Future[None]) -> None:
        conn.resume_seq_ack = self.last_seq
        await conn.ws.send_str(self._frame(Opcode.RESUME, {
            "server_id": self.server_id,
            "session_id": self._session_id,
            "token": self._token,
            "seq_ack": self.last_seq,
        }))
        await self._step(conn.resumed, reader, "Resumed (op 9)", self.config.connect_timeout)

    async def _step(
        self, awaitable: Any, reader: asyncio.Future[None], what: str, timeout: float | None
    ) -> Any:
        """Wait for one handshake step, unless the websocket ends or ``timeout`` passes first."""
        step = asyncio.ensure_future(awaitable)
        try:
            done, _ = await asyncio.wait({step, reader}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            step.cancel()
            raise
        if step in done:
            return step.result()
        step.cancel()
        await asyncio.wait({step})  # let a cancelled discovery leave the socket before it is closed
        if reader in done:
            raise _ConnectionEnded
        raise ConnectTimeout(f"no {what} from the voice gateway within {timeout:g} s")

    # ------------------------------------------------------------------ receiving

    async def _read_loop(self, conn: _Connection) -> None:
        ws = conn.ws
        while True:
            msg = await ws.receive()
            kind = msg.type
            if kind is aiohttp.WSMsgType.TEXT:
                self._on_text(conn, msg.data)
            elif kind is aiohttp.WSMsgType.BINARY:
                self._on_binary(conn, msg.data)
            elif kind is aiohttp.WSMsgType.CLOSE:
                conn.close_code = msg.data
                conn.close_reason = msg.extra or ""
                log.debug("server closed the voice websocket: %s %r", msg.data, conn.close_reason)
                return
            elif kind is aiohttp.WSMsgType.ERROR:
                conn.error = msg.data
                return
            elif kind in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                return  # we closed it, or the TCP connection ended without a close frame

    def _on_text(self, conn: _Connection, text: str) -> None:
        try:
            message = json.loads(text)
            op = message["op"]
        except (ValueError, TypeError, KeyError):
            log.debug("ignoring a malformed voice gateway message (%d chars)", len(text))
            return
        seq = message.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool):
            self.last_seq = seq
        d = message.get("d")
        try:
            self._dispatch(conn, op, d)
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
            # ArithmeticError: int() of a non-finite JSON number (1e999 parses as inf).
            log.debug("ignoring malformed op %s: %r", op, exc)

    def _on_binary(self, conn: _Connection, data: bytes) -> None:
        if len(data) < _BINARY_PREFIX.size:
            log.debug("ignoring a %d-byte binary frame", len(data))
            return
        seq, op = _BINARY_PREFIX.unpack_from(data, 0)
        self.last_seq = seq  # binary frames count toward seq_ack too (spec §1.3)
        if op in DAVE_OPCODES:
            self._event(conn, "on_dave_message", op, bytes(data[_BINARY_PREFIX.size:]))
        else:
            log.debug("ignoring binary op %d", op)

    def _dispatch(self, conn: _Connection, op: Any, d: Any) -> None:
        if op == Opcode.HEARTBEAT_ACK:
            self._on_heartbeat_ack(conn, d)
        elif op == Opcode.HELLO:
            interval = self.config.heartbeat_interval or float(d["heartbeat_interval"]) / 1000.0
            if not 0.0 < interval < 3600.0:  # also rejects NaN; a zero/negative one would spin
                raise ValueError(f"heartbeat_interval {d['heartbeat_interval']!r} out of range")
            if conn.heartbeat_task is not None:
                conn.heartbeat_task.cancel()
            conn.heartbeat_task = asyncio.ensure_future(self._heartbeat_loop(conn, interval))
            log.debug("Hello: heartbeat every %.3f s", interval)
        elif op == Opcode.READY:
            if not conn.ready.done():
                conn.ready.set_result(d)
        elif op == Opcode.SESSION_DESCRIPTION:
            if not conn.session_description.done():
                conn.session_description.set_result(d)
            else:
                log.debug("ignoring a repeated Session Description")
        elif op == Opcode.RESUMED:
            if conn.resuming and not conn.established:
                # Report it here, not in _resume(): the replayed messages that follow op 9 are
                # dispatched by this same reader before _resume() would get to run.
                conn.established = True
                self._set_state("ready", f"resumed at seq_ack {conn.resume_seq_ack}")
                self._notify("on_resumed")
            if not conn.resumed.done():
                conn.resumed.set_result(None)
        elif op == Opcode.SPEAKING:
            self._event(conn, "on_speaking", int(d["user_id"]), int(d["ssrc"]), int(d["speaking"]))
        elif op == Opcode.CLIENTS_CONNECT:
            self._event(conn, "on_clients_connect", [int(u) for u in d["user_ids"]])
        elif op == Opcode.CLIENT_DISCONNECT:
            self._event(conn, "on_client_disconnect", int(d["user_id"]))
        elif isinstance(op, int) and op in DAVE_OPCODES:
            self._event(conn, "on_dave_message", op, d)
        else:
            log.debug("ignoring voice gateway op %r", op)

    def _event(self, conn: _Connection, name: str, *args: Any) -> None:
        # Before on_session the listener cannot place these (no SSRC, no DAVE version yet): hold
        # them and deliver them right after it, in order.
        if conn.held_events is not None and not conn.established:
            conn.held_events.append((name, args))
        else:
            self._notify(name, *args)

    # ------------------------------------------------------------------ heartbeats

    async def _heartbeat_loop(self, conn: _Connection, interval: float) -> None:
        limit = self.config.max_missed_heartbeat_acks
        while not conn.ws.closed:
            if conn.unacked >= limit:
                log.warning("no heartbeat ACK for %d heartbeats; the voice websocket is dead, resuming",
                            conn.unacked)
                conn.zombie = True
                await self._close_ws(conn.ws, _RESUME_CLOSE_CODE, b"heartbeat ACKs missed")
                return
            now_ms = int(time.time() * 1000)
            # t must identify this beat: keep it strictly increasing even with sub-ms intervals.
            self._beat_t = t = max(now_ms, self._beat_t + 1)
            conn.sent_beats[t] = time.monotonic()
            if len(conn.sent_beats) > 32:
                del conn.sent_beats[next(iter(conn.sent_beats))]
            conn.unacked += 1
            try:
                await conn.ws.send_str(self._frame(Opcode.HEARTBEAT, {"t": t, "seq_ack": self.last_seq}))
            except (ConnectionError, RuntimeError, aiohttp.ClientError):
                return  # the reader sees the end of the connection
            await asyncio.sleep(interval)

    def _on_heartbeat_ack(self, conn: _Connection, d: Any) -> None:
        conn.unacked = 0
        t = d.get("t") if isinstance(d, dict) else d  # below v8 the ACK is the bare nonce
        sent = conn.sent_beats.pop(t, None) if isinstance(t, int) else None
        if sent is not None:
            self.latency = time.monotonic() - sent

    # ------------------------------------------------------------------ sending

    @staticmethod
    def _frame(op: int, d: Any) -> str:
        return json.dumps({"op": int(op), "d": d}, separators=(",", ":"))

    def _speaking_frame(self, flags: int) -> str:
        if self.ssrc is None:
            raise GatewayError("speaking needs the SSRC from Ready; wait for on_session")
        return self._frame(Opcode.SPEAKING, {"speaking": int(flags), "delay": 0, "ssrc": self.ssrc})

    def _enqueue(self, frame: str | bytes, done: asyncio.Future[None] | None) -> None:
        if self._closed or self._closing:
            raise ClientClosed("the voice gateway is closed")
        self._outbox.append((frame, done))
        if self._outbox_ready is not None:
            self._outbox_ready.set()

    async def _send_loop(self, conn: _Connection) -> None:
        """Write queued client messages in order while the session is ready; kept across resumes."""
        assert self._outbox_ready is not None
        ws = conn.ws
        while not ws.closed:
            while self._outbox:
                frame, done = self._outbox[0]
                try:
                    if isinstance(frame, str):
                        await ws.send_str(frame)
                    else:
                        await ws.send_bytes(frame)
                except (ConnectionError, RuntimeError, aiohttp.ClientError):
                    return  # stays queued for the resumed connection
                self._outbox.popleft()
                if done is not None and not done.done():
                    done.set_result(None)
            self._outbox_ready.clear()
            await self._outbox_ready.wait()

    def _drop_outbox(self, error: BaseException) -> None:
        while self._outbox:
            _, done = self._outbox.popleft()
            if done is not None and not done.done():
                done.set_exception(error)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    async def _close_ws(ws: aiohttp.ClientWebSocketResponse, code: int, message: bytes) -> None:
        # Bounded: a dead peer never answers the close frame; cancelling aborts the transport.
        try:
            await asyncio.wait_for(ws.close(code=code, message=message), 2.0)
        except (asyncio.TimeoutError, ConnectionError, aiohttp.ClientError, RuntimeError):
            pass

    def _set_state(self, state: str, detail: str = "") -> None:
        self.state = state
        log.debug("voice gateway state: %s %s", state, detail)
        self._notify("on_state", state, detail)

    def _notify(self, name: str, *args: Any) -> None:
        callback = getattr(self._listener, name, None)
        if callback is None:
            return
        try:
            callback(*args)
        except Exception as exc:
            loop = self._loop or asyncio.get_running_loop()
            loop.call_exception_handler({
                "message": f"GatewayListener.{name} raised",
                "exception": exc,
                "gateway": self,
            })

    async def _finish(self, code: int | None, error: BaseException | None) -> None:
        self._closing = True
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
            self._keepalive_task = None
        self._drop_outbox(error if error is not None else ClientClosed("the voice gateway was closed"))
        if self._own_http and self._http is not None:
            await self._http.close()
        self._closed = True
        self.close_code, self.close_error = code, error
        if error is not None:
            log.warning("voice gateway closed: %s", error)
        self._set_state("closed", describe_close_code(code) if code is not None else str(error or ""))
        self._notify("on_closed", code, error)
        if self.session_info is not None:
            self.session_info.sock.close()
