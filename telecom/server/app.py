"""The node: an aiohttp.web application that drives :class:`telecom.Client` objects for remote callers.

What it owns: sessions (one per events websocket, resumable for a timeout with events buffered while
detached), players (one voice connection per guild per session), their tracks and recordings, the
JSON error shape, authentication, input validation, node stats, ``/metrics`` and ``/openapi.json``.
The aiohttp app runs on its own asyncio loop (the main thread under ``python -m telecom.server``);
the clients do their work on telecom's io and media threads, and their events are handed to the app's
loop with ``call_soon_threadsafe``.

What it must not do: audio work (the engine does it), fetch a URL the :class:`UrlPolicy` has not seen,
or open a local path outside the media root.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections import deque
from typing import Any, Awaitable, Callable

from aiohttp import WSMsgType, web

from telecom._framing import split_length_prefixed
from telecom.errors import (BufferFull, CodecError, ConfigurationError, SourceError, SourceNotFound,
                            TelecomError)
from telecom.server.config import ServerConfig
from telecom.server.security import MediaRoot, UrlPolicy, UrlRefused, safe_child

log = logging.getLogger("telecom.server")

API = "/v1"
VERSION = "0.1.0"
RECORDING_FORMATS = ("wav", "flac", "ogg", "opus", "mp3")
_SNOWFLAKE = re.compile(r"^[1-9][0-9]{0,18}$")
_EVENTS = ("ready", "resumed", "disconnect", "error", "speaking_start", "speaking_stop", "user_join",
           "user_leave", "track_start", "track_end", "track_error", "dave", "state", "waiting_for_server",
           "closed")



# Upper edges (s) of the HTTP request duration histogram's buckets, the last one +Inf.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))

class ApiError(Exception):
    """An error answer: ``status`` with a short ``error`` reason and a ``message`` for people."""

    def __init__(self, status: int, message: str, error: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error = error or _REASONS.get(status, "Error")


_REASONS = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            409: "Conflict", 413: "Payload Too Large", 422: "Unprocessable Entity", 429: "Too Many Requests",
            500: "Internal Server Error"}


def error_body(status: int, message: str, path: str, error: str | None = None) -> dict:
    return {"timestamp": int(time.time() * 1000), "status": status,
            "error": error or _REASONS.get(status, "Error"), "message": message, "path": path}


# -- validation helpers -----------------------------------------------------------------------------
def snowflake(value: Any, what: str, status: int = 422) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ApiError(status, f"{what} must be a snowflake (a digit string)")
    text = str(value)
    if not _SNOWFLAKE.match(text) or not 0 < int(text) < 2**64:
        raise ApiError(status, f"{what} must be a snowflake (a digit string), not {text[:40]!r}")
    return int(text)


def _number(body: dict, key: str, lo: float, hi: float) -> float | None:
    if key not in body or body[key] is None:
        return None
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ApiError(422, f"{key} must be a number in [{lo:g}, {hi:g}]")
    return float(value)


def _bool(body: dict, key: str) -> bool | None:
    if key not in body or body[key] is None:
        return None
    if not isinstance(body[key], bool):
        raise ApiError(422, f"{key} must be a boolean")
    return body[key]


def _string(body: dict, key: str, *, required: bool = False, max_len: int = 4096) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise ApiError(422, f"{key} is required")
        return None
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise ApiError(422, f"{key} must be a non-empty string of at most {max_len} characters")
    return value


def _only(body: dict, allowed: set[str], what: str) -> None:
    extra = set(body) - allowed
    if extra:
        raise ApiError(422, f"unknown field(s) in {what}: {', '.join(sorted(extra))[:200]}")


def jsonable(value: Any) -> Any:
    """Event data and stats as JSON: playables become track ids, errors their message."""
    from telecom.playable import Playable

    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return str(value) if value > 2**53 else value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, Playable):
        return str(value.id)
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


# -- state --------------------------------------------------------------------------------------------
class TrackEntry:
    def __init__(self, playable: Any, source: dict) -> None:
        self.playable = playable
        self.source = source
        self.started = time.time()
        self.input_closed = False          # PCM and Opus tracks: /end was called

    def to_json(self) -> dict:
        p = self.playable
        return {"id": str(p.id), "source": self.source, "state": p.state, "position": round(p.position, 3),
                "duration": p.duration, "volume": p.volume, "frames_played": p.frames_played,
                "underruns": p.underruns}


class Recording:
    def __init__(self, rid: str, name: str, user_id: int | None, output: Any, muxer: Any = None) -> None:
        self.id = rid
        self.name = name
        self.user_id = user_id
        self.output = output
        self.muxer = muxer
        self.started = time.time()
        self.stopped: float | None = None

    def to_json(self) -> dict:
        return {"id": self.id, "file": self.name, "user_id": None if self.user_id is None else str(self.user_id),
                "mix": self.muxer is not None, "started": self.started, "stopped": self.stopped,
                "frames": getattr(self.output, "frames", 0)}


class Player:
    """One voice connection (a :class:`telecom.Client`) of one session in one guild."""

    def __init__(self, node: "Node", session: "Session", guild_id: int) -> None:
        self.node = node
        self.session = session
        self.guild_id = guild_id
        self.client: Any = None
        self.voice: dict = {}
        self.tracks: dict[str, TrackEntry] = {}
        self.recordings: dict[str, Recording] = {}
        self.created = time.time()

    def to_json(self) -> dict:
        client = self.client
        stats = jsonable(client.stats()) if client is not None else None
        if stats is not None:
            stats.pop("playables", None)
        voice = {k: v for k, v in self.voice.items() if k != "token"}
        return {
            "guild_id": str(self.guild_id),
            "state": client.state if client is not None else "idle",
            "volume": client.volume if client is not None else 100.0,
            "voice": jsonable(voice),
            "tracks": [t.to_json() for t in self.tracks.values()],
            "recordings": [r.to_json() for r in self.recordings.values()],
            "stats": stats,
        }

    def prune(self) -> None:
        for tid, entry in list(self.tracks.items()):
            if entry.playable.state in ("stopped", "ended"):
                del self.tracks[tid]

    def close(self) -> None:
        for rec in list(self.recordings.values()):
            self.node.stop_recording(self, rec)
        client, self.client = self.client, None
        if client is not None:
            self.node.retire_counters(client)
            client.close()


class Session:
    def __init__(self, sid: str, user_id: int | None, config: ServerConfig) -> None:
        self.id = sid
        self.user_id = user_id
        self.players: dict[int, Player] = {}
        self.ws: web.WebSocketResponse | None = None
        self.resuming = False
        self.timeout = float(config.resume_timeout)
        self.buffer: deque = deque(maxlen=config.event_buffer)
        self.expiry: asyncio.TimerHandle | None = None
        self.dropped_events = 0

    def to_json(self) -> dict:
        return {"id": self.id, "resuming": self.resuming, "timeout": self.timeout,
                "connected": self.ws is not None, "players": len(self.players)}


class Node:
    """All of a node's state plus its request handlers."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.policy = UrlPolicy(allow=config.allow, deny=config.deny, allow_private=config.allow_private)
        self.media = MediaRoot(config.media_root)
        self.recordings_dir = os.path.abspath(config.recordings_dir)
        self.sessions: dict[str, Session] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.started = time.time()
        self.http_counts: dict[tuple[str, str, int], int] = {}
        self.http_seconds: dict[tuple[str, str], list[Any]] = {}   # [count, sum, per-bucket counts]
        self.events_sent = 0
        self.retired = {"frames_sent": 0, "late": 0, "underruns": 0, "skipped": 0}
        self._cpu_mark = (time.monotonic(), time.process_time())
        self.cpu_load = 0.0
        self._stats_task: asyncio.Task | None = None

    # -- app ---------------------------------------------------------------------------------------
    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body,
                              middlewares=[self._errors_middleware, self._auth_middleware])
        r = app.router
        r.add_get(f"{API}/info", self.info)
        r.add_get(f"{API}/stats", self.stats_route)
        r.add_get(f"{API}/websocket", self.websocket)
        r.add_get(f"{API}/sessions/{{sid}}", self.get_session)
        r.add_patch(f"{API}/sessions/{{sid}}", self.patch_session)
        r.add_get(f"{API}/sessions/{{sid}}/players", self.list_players)
        r.add_get(f"{API}/sessions/{{sid}}/players/{{guild_id}}", self.get_player)
        r.add_patch(f"{API}/sessions/{{sid}}/players/{{guild_id}}", self.patch_player)
        r.add_delete(f"{API}/sessions/{{sid}}/players/{{guild_id}}", self.delete_player)
        r.add_post(f"{API}/sessions/{{sid}}/players/{{guild_id}}/tracks", self.post_track)
        r.add_get(f"{API}/sessions/{{sid}}/players/{{guild_id}}/tracks/{{track_id}}", self.get_track)
        r.add_patch(f"{API}/sessions/{{sid}}/players/{{guild_id}}/tracks/{{track_id}}", self.patch_track)
        r.add_delete(f"{API}/sessions/{{sid}}/players/{{guild_id}}/tracks/{{track_id}}", self.delete_track)
        r.add_post(f"{API}/sessions/{{sid}}/players/{{guild_id}}/tracks/{{track_id}}/pcm", self.post_pcm)
        r.add_post(f"{API}/sessions/{{sid}}/players/{{guild_id}}/tracks/{{track_id}}/opus", self.post_opus)
        r.add_post(f"{API}/sessions/{{sid}}/players/{{guild_id}}/tracks/{{track_id}}/end", self.post_pipe_end)
        r.add_post(f"{API}/sessions/{{sid}}/players/{{guild_id}}/recordings", self.post_recording)
        r.add_delete(f"{API}/sessions/{{sid}}/players/{{guild_id}}/recordings/{{rid}}",
                     self.delete_recording)
        r.add_get(f"{API}/recordings", self.list_recordings)
        r.add_get(f"{API}/recordings/{{name}}", self.download_recording)
        r.add_get("/metrics", self.metrics)
        r.add_get("/openapi.json", self.openapi)
        app.on_startup.append(self._startup)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _startup(self, app: web.Application) -> None:
        self.loop = asyncio.get_running_loop()
        os.makedirs(self.recordings_dir, exist_ok=True)
        options = {"media_threads": self.config.media_threads or None,
                   "realtime_priority": self.config.realtime_priority or None,
                   "work_ahead": None if self.config.work_ahead else False,
                   "rebalance": None if self.config.rebalance else False}
        options = {k: v for k, v in options.items() if v is not None}
        if options:
            from telecom.engine import configure

            try:
                configure(**options)
            except TelecomError as exc:
                log.warning("engine options %s not applied: %s", options, exc)
        self._stats_task = self.loop.create_task(self._stats_loop())

    async def _shutdown(self, app: web.Application) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
        for session in list(self.sessions.values()):
            if session.ws is not None:
                await session.ws.close(code=1001, message=b"node shutting down")
            self.destroy_session(session)

    @web.middleware
    async def _errors_middleware(self, request: web.Request, handler: Callable[..., Awaitable]) -> Any:
        started = time.perf_counter()
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "?"
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except ApiError as exc:
            status = exc.status
            return web.json_response(error_body(exc.status, exc.message, request.path, exc.error),
                                     status=exc.status)
        except web.HTTPException as exc:
            status = exc.status
            if exc.status < 400:
                raise
            message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
            return web.json_response(error_body(exc.status, message, request.path), status=exc.status,
                                     headers={k: v for k, v in exc.headers.items() if k == "Allow"})
        except Exception:  # noqa: BLE001 - an unexpected failure is a 500 with a log line, never a hang
            log.exception("%s %s failed", request.method, request.path)
            status = 500
            return web.json_response(error_body(500, "internal error (see the node's log)", request.path),
                                     status=500)
        finally:
            key = (request.method, route, status)
            self.http_counts[key] = self.http_counts.get(key, 0) + 1
            took = time.perf_counter() - started
            acc = self.http_seconds.setdefault((request.method, route), [0, 0.0, [0] * len(HTTP_BUCKETS)])
            acc[0] += 1
            acc[1] += took
            for i, edge in enumerate(HTTP_BUCKETS):
                if took <= edge:
                    acc[2][i] += 1
                    break

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Callable[..., Awaitable]) -> Any:
        if not self.config.no_auth and request.path != "/openapi.json":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), (self.config.password or "").encode()):
                raise ApiError(401, "missing or wrong Authorization header")
        return await handler(request)

    async def _json(self, request: web.Request) -> dict:
        if request.content_length is not None and request.content_length > self.config.max_body:
            raise ApiError(413, f"request body over {self.config.max_body} bytes")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(413, f"request body over {self.config.max_body} bytes") from None
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    # -- lookups -------------------------------------------------------------------------------------
    def _session(self, request: web.Request) -> Session:
        sid = request.match_info["sid"]
        session = self.sessions.get(sid)
        if session is None:
            raise ApiError(404, f"no session {sid[:64]!r}")
        return session

    def _player(self, request: web.Request) -> Player:
        session = self._session(request)
        gid = snowflake(request.match_info["guild_id"], "guild_id", 400)
        player = session.players.get(gid)
        if player is None:
            raise ApiError(404, f"no player for guild {gid} in this session")
        return player

    def _track(self, request: web.Request) -> tuple[Player, TrackEntry]:
        player = self._player(request)
        tid = request.match_info["track_id"]
        entry = player.tracks.get(tid)
        if entry is None:
            raise ApiError(404, f"no track {tid[:40]!r} on this player")
        return player, entry

    # -- info, stats -----------------------------------------------------------------------------------
    async def info(self, request: web.Request) -> web.Response:
        import telecom
        from telecom.engine import settings

        return web.json_response({
            "version": VERSION, "telecom": getattr(telecom, "__version__", VERSION), "api": API,
            "sources": ["url", "file", "pcm", "opus"], "recording_formats": list(RECORDING_FORMATS),
            "url_policy": self.policy.describe(), "media_root": self.media.root is not None,
            "auth": not self.config.no_auth, "engine": settings(),
        })

    def stats(self) -> dict:
        now, cpu = time.monotonic(), time.process_time()
        mark_wall, mark_cpu = self._cpu_mark
        if now - mark_wall >= 0.5:
            self.cpu_load = max(0.0, (cpu - mark_cpu) / (now - mark_wall) / (os.cpu_count() or 1))
            self._cpu_mark = (now, cpu)
        players = playing = tracks = 0
        frames = dict(self.retired)
        for session in self.sessions.values():
            for player in session.players.values():
                players += 1
                client = player.client
                if client is None:
                    continue
                live = [p for p in client.playables if p.state == "playing"]
                tracks += len(live)
                playing += bool(live)
                try:
                    s = client.stats()
                except TelecomError:
                    continue
                for key in frames:
                    frames[key] += int(s.get(key) or 0)
        return {
            "players": players, "playing_players": playing, "playing_tracks": tracks,
            "sessions": len(self.sessions), "uptime": round(time.time() - self.started, 3),
            "cpu": {"cores": os.cpu_count() or 1, "process_load": round(self.cpu_load, 4)},
            "memory": {"rss": _rss_bytes()},
            "frames": {"sent": frames["frames_sent"], "late": frames["late"],
                       "deficit": frames["underruns"], "skipped": frames["skipped"]},
        }

    def send_lateness(self) -> dict:
        """The media threads' send lateness (a packet's departure after its 20 ms deadline), summed over
        threads: cumulative buckets [[upper edge s or None for +Inf, packets]], sum (s) and count."""
        from telecom.engine import get_engine

        threads = get_engine().stats()["threads"]
        buckets: list[list[Any]] = []
        for t in threads:
            for i, (edge, count) in enumerate(t["send_lateness_buckets"]):
                if i == len(buckets):
                    buckets.append([edge, 0])
                buckets[i][1] += count
        return {"buckets": buckets, "sum": sum(t["send_lateness_sum_s"] for t in threads),
                "count": sum(t["packets"] for t in threads),
                "ahead": sum(t.get("ahead_frames", 0) for t in threads),
                "moved": sum(t.get("moved_out", 0) for t in threads)}

    def retire_counters(self, client: Any) -> None:
        try:
            s = client.stats()
        except TelecomError:
            return
        for key in self.retired:
            self.retired[key] += int(s.get(key) or 0)

    async def stats_route(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_interval)
            try:
                message = {"op": "stats", **self.stats()}
                for session in list(self.sessions.values()):
                    if session.ws is not None:
                        await self._send(session, message, buffer=False)
            except Exception:  # noqa: BLE001 - stats must never stop
                log.exception("stats broadcast failed")

    async def metrics(self, request: web.Request) -> web.Response:
        from telecom.server.metrics import render

        return web.Response(text=render(self), content_type="text/plain",
                            headers={"X-Content-Type-Options": "nosniff"}, charset="utf-8")

    async def openapi(self, request: web.Request) -> web.Response:
        from telecom.server.openapi import spec

        return web.json_response(spec())

    # -- websocket and sessions -------------------------------------------------------------------------
    async def websocket(self, request: web.Request) -> web.StreamResponse:
        user = request.headers.get("User-Id")
        user_id = snowflake(user, "User-Id header", 400) if user else None
        wanted = request.headers.get("Session-Id")
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=self.config.max_body)
        if not ws.can_prepare(request).ok:
            raise ApiError(400, "this route is a websocket: connect with an Upgrade request")
        await ws.prepare(request)
        session = self.sessions.get(wanted) if wanted else None
        resumed = session is not None and session.ws is None and session.resuming
        if resumed:
            assert session is not None
            if session.expiry is not None:
                session.expiry.cancel()
                session.expiry = None
            if user_id is not None:
                session.user_id = user_id
        else:
            session = Session(secrets.token_hex(8), user_id, self.config)
            self.sessions[session.id] = session
        session.ws = ws
        await self._send(session, {"op": "ready", "resumed": resumed, "session_id": session.id}, buffer=False)
        if resumed:
            backlog = list(session.buffer)
            session.buffer.clear()
            for message in backlog:
                await self._send(session, message)
        log.info("session %s %s", session.id, "resumed" if resumed else "opened")
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT and msg.data == "ping":
                    await ws.send_str("pong")
        finally:
            if session.ws is ws:
                session.ws = None
                self._detached(session)
        return ws

    def _detached(self, session: Session) -> None:
        if session.resuming and session.id in self.sessions:
            assert self.loop is not None
            session.expiry = self.loop.call_later(session.timeout, self._expire, session)
            log.info("session %s detached; players kept for %.1f s", session.id, session.timeout)
        else:
            self.destroy_session(session)

    def _expire(self, session: Session) -> None:
        if session.ws is None:
            log.info("session %s expired", session.id)
            self.destroy_session(session)

    def destroy_session(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        for player in list(session.players.values()):
            player.close()
        session.players.clear()

    async def _send(self, session: Session, message: dict, buffer: bool = True) -> None:
        ws = session.ws
        if ws is None or ws.closed:
            if buffer:
                if len(session.buffer) == session.buffer.maxlen:
                    session.dropped_events += 1
                session.buffer.append(message)
            return
        try:
            await ws.send_str(json.dumps(message))
            self.events_sent += 1
        except (ConnectionError, RuntimeError):
            if buffer:
                session.buffer.append(message)

    async def get_session(self, request: web.Request) -> web.Response:
        return web.json_response(self._session(request).to_json())

    async def patch_session(self, request: web.Request) -> web.Response:
        session = self._session(request)
        body = await self._json(request)
        _only(body, {"resuming", "timeout"}, "session update")
        resuming = _bool(body, "resuming")
        timeout = _number(body, "timeout", 1, 86400)
        if resuming is not None:
            session.resuming = resuming
        if timeout is not None:
            session.timeout = timeout
        if session.ws is None and not session.resuming:
            self.destroy_session(session)    # detached and no longer resumable: its players go now
        return web.json_response({"resuming": session.resuming, "timeout": session.timeout})

    # -- players ------------------------------------------------------------------------------------
    async def list_players(self, request: web.Request) -> web.Response:
        session = self._session(request)
        for p in session.players.values():
            p.prune()
        return web.json_response([p.to_json() for p in session.players.values()])

    async def get_player(self, request: web.Request) -> web.Response:
        player = self._player(request)
        player.prune()
        return web.json_response(player.to_json())

    async def delete_player(self, request: web.Request) -> web.Response:
        player = self._player(request)
        player.close()
        player.session.players.pop(player.guild_id, None)
        return web.Response(status=204)

    async def patch_player(self, request: web.Request) -> web.Response:
        session = self._session(request)
        gid = snowflake(request.match_info["guild_id"], "guild_id", 400)
        body = await self._json(request)
        _only(body, {"voice", "track", "replace", "paused", "volume", "position", "stop"}, "player update")
        stop = _bool(body, "stop")
        volume = _number(body, "volume", 0, 200)
        paused = _bool(body, "paused")
        position = _number(body, "position", 0, 86400)
        replace = _bool(body, "replace")
        track = body.get("track")
        if track is not None and not isinstance(track, dict):
            raise ApiError(422, "track must be an object")
        voice = body.get("voice")
        player = session.players.get(gid)
        if voice is not None:
            voice = self._check_voice(voice, session)
        if player is None:
            if voice is None:
                raise ApiError(409, "no voice connection for this guild yet: send voice first")
            if sum(len(s.players) for s in self.sessions.values()) >= self.config.max_players:
                raise ApiError(409, f"this node holds its maximum of {self.config.max_players} players")
            player = Player(self, session, gid)
        if voice is not None:
            self._apply_voice(player, voice)
            session.players[gid] = player
        client = player.client
        if client is None:
            raise ApiError(409, "this player has no voice connection")
        if volume is not None:
            client.set_volume(volume)
        if stop:
            for entry in list(player.tracks.values()):
                entry.playable.stop()
            player.tracks.clear()
        if track is not None:
            await self._play(player, track, True if replace is None else replace)
        for entry in list(player.tracks.values()):
            if paused is True:
                entry.playable.pause()
            elif paused is False:
                entry.playable.resume()
            if position is not None:
                self._seek(entry, position)
        player.prune()
        return web.json_response(player.to_json())

    def _check_voice(self, voice: Any, session: Session) -> dict:
        if not isinstance(voice, dict):
            raise ApiError(422, "voice must be an object")
        _only(voice, {"user_id", "session_id", "channel_id", "endpoint", "token"}, "voice")
        out = {"session_id": _string(voice, "session_id", required=True, max_len=256),
               "token": _string(voice, "token", required=True, max_len=512),
               "endpoint": _string(voice, "endpoint", required=True, max_len=512)}
        user = voice.get("user_id", session.user_id)
        if user is None:
            raise ApiError(422, "voice.user_id is required (or a User-Id header on the websocket)")
        out["user_id"] = snowflake(user, "voice.user_id")
        channel = voice.get("channel_id")
        out["channel_id"] = None if channel is None else snowflake(channel, "voice.channel_id")
        from telecom.gateway import voice_gateway_url

        try:
            voice_gateway_url(out["endpoint"])
        except ConfigurationError as exc:
            raise ApiError(422, f"voice.endpoint: {exc}") from None
        return out

    def _apply_voice(self, player: Player, voice: dict) -> None:
        from telecom import Client

        old = player.voice
        client = player.client
        same = (client is not None and old.get("session_id") == voice["session_id"]
                and old.get("user_id") == voice["user_id"])
        if not same:
            if client is not None:
                player.close()
            client = Client(voice["user_id"], player.guild_id, voice["session_id"],
                            channel_id=voice["channel_id"])
            player.client = client
            client.on("*", lambda event, p=player: self._from_client(p, event))
        try:
            # A new endpoint/token on the same session is a move: the client carries its playables over.
            client.set_server_info(voice["endpoint"], voice["token"], channel_id=voice["channel_id"])
        except ConfigurationError as exc:
            raise ApiError(422, str(exc)) from None
        player.voice = voice

    def _from_client(self, player: Player, event: Any) -> None:
        # telecom's io thread: hand over to the app's loop
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._deliver_event, player, event)

    def _deliver_event(self, player: Player, event: Any) -> None:
        if event.name not in _EVENTS:
            return
        message = {"op": "event", "type": event.name, "guild_id": str(player.guild_id),
                   **{k: jsonable(v) for k, v in event.data.items()}}
        if "playable" in message:
            message["track_id"] = message.pop("playable")
        if self.loop is not None:
            self.loop.create_task(self._send(player.session, message))

    # -- tracks ---------------------------------------------------------------------------------------
    async def _play(self, player: Player, spec: dict, replace: bool) -> TrackEntry:
        from telecom import Playable

        _only(spec, {"url", "file", "pcm", "opus", "buffer_seconds", "volume", "position", "paused",
                     "ahead_seconds"}, "track")
        url = _string(spec, "url")
        name = _string(spec, "file")
        pcm = _bool(spec, "pcm") or False
        opus = _bool(spec, "opus") or False
        if (url is not None) + (name is not None) + pcm + opus != 1:
            raise ApiError(422, "a track needs exactly one of url, file, pcm: true or opus: true")
        volume = _number(spec, "volume", 0, 200)
        position = _number(spec, "position", 0, 86400)
        paused = _bool(spec, "paused")
        ahead = _number(spec, "ahead_seconds", 0.5, 60) or 5.0
        buffer_seconds = _number(spec, "buffer_seconds", 0.1, 60)
        if (pcm or opus) and position:
            raise ApiError(422, "a PCM or Opus track plays what it is sent: it has no position to start from")
        if buffer_seconds is not None and not (pcm or opus):
            raise ApiError(422, "buffer_seconds is for PCM and Opus tracks (url/file tracks use ahead_seconds)")
        try:
            if pcm:
                playable = Playable.from_pcm_pipe(buffer_seconds=buffer_seconds or 10.0)
                source = {"pcm": True}
            elif opus:
                playable = Playable.from_opus_pipe(buffer_seconds=buffer_seconds or 10.0)
                source = {"opus": True}
            elif url is not None:
                from telecom.sources.track import Track, url_opener

                assert self.loop is not None
                # getaddrinfo blocks: resolve in a worker thread; the fetch re-checks every hop and peer.
                await self.loop.run_in_executor(None, self.policy.check_url, url)
                options = dict(ssl=None, connect_timeout=10.0, read_timeout=15.0, reconnects=3, headers=None,
                               max_redirects=5, redirect_check=self.policy.redirect_check,
                               connect_check=self.policy.connect_check)
                playable = Track(url, url_opener(url, options), ahead_seconds=ahead)
                source = {"url": url}
            else:
                path = self.media.resolve(name)
                if not os.path.isfile(path):
                    raise ApiError(404, f"no file {name!r} under the media root")
                playable = Playable.from_file(path, ahead_seconds=ahead)
                source = {"file": name}
        except UrlRefused as exc:
            raise ApiError(422, str(exc), "URL Refused") from None
        except SourceNotFound as exc:
            raise ApiError(404, str(exc)) from None
        except (ConfigurationError, SourceError) as exc:
            raise ApiError(422, str(exc)) from None
        if volume is not None:
            playable.set_volume(volume)
        if position:
            try:
                playable.seek(position)
            except ConfigurationError as exc:
                raise ApiError(422, str(exc)) from None
        player.client.play(playable, replace=replace)
        if paused:
            playable.pause()
        entry = TrackEntry(playable, source)
        if replace:
            player.tracks.clear()
        player.tracks[str(playable.id)] = entry
        return entry

    def _seek(self, entry: TrackEntry, position: float) -> None:
        try:
            entry.playable.seek(position)
        except ConfigurationError as exc:
            raise ApiError(422, str(exc)) from None

    async def post_track(self, request: web.Request) -> web.Response:
        player = self._player(request)
        body = await self._json(request)
        replace = body.pop("replace", False)
        if not isinstance(replace, bool):
            raise ApiError(422, "replace must be a boolean")
        if player.client is None:
            raise ApiError(409, "this player has no voice connection")
        entry = await self._play(player, body, replace)
        return web.json_response(entry.to_json(), status=201)

    async def get_track(self, request: web.Request) -> web.Response:
        _, entry = self._track(request)
        return web.json_response(entry.to_json())

    async def patch_track(self, request: web.Request) -> web.Response:
        _, entry = self._track(request)
        body = await self._json(request)
        _only(body, {"paused", "volume", "position"}, "track update")
        volume = _number(body, "volume", 0, 200)
        paused = _bool(body, "paused")
        position = _number(body, "position", 0, 86400)
        if entry.playable.state in ("stopped", "ended"):
            raise ApiError(409, "this track has ended")
        if volume is not None:
            entry.playable.set_volume(volume)
        if paused is True:
            entry.playable.pause()
        elif paused is False:
            entry.playable.resume()
        if position is not None:
            self._seek(entry, position)
        return web.json_response(entry.to_json())

    def _pipe_track(self, request: web.Request, kinds: tuple, what: str) -> TrackEntry:
        _, entry = self._track(request)
        if not isinstance(entry.playable, kinds):
            raise ApiError(409, f"this track is not {what}")
        return entry

    def _pcm_track(self, request: web.Request) -> TrackEntry:
        from telecom import PcmPipe

        return self._pipe_track(request, (PcmPipe,), "a PCM track (create one with {\"pcm\": true})")

    async def post_pcm(self, request: web.Request) -> web.Response:
        """Raw 48 kHz s16le stereo into a PCM track: all of it or none (429 when it does not fit now)."""
        entry = self._pcm_track(request)
        pipe = entry.playable
        data = await request.read()
        if len(data) % 4:
            raise ApiError(422, f"{len(data)} bytes is not a whole number of stereo s16 samples (4 bytes each)")
        if pipe.state in ("stopped", "ended") or entry.input_closed:
            raise ApiError(409, "this PCM track has ended or its input was closed")
        try:
            pipe.send(data)
        except BufferFull:
            raise ApiError(429, f"the track's buffer holds {pipe.buffered} of {pipe.capacity} bytes; "
                                f"{len(data)} more do not fit: retry when it has played some") from None
        except ConfigurationError as exc:
            raise ApiError(422, str(exc)) from None
        return web.json_response({"buffered": pipe.buffered, "capacity": pipe.capacity})

    async def post_opus(self, request: web.Request) -> web.Response:
        """20 ms Opus packets into an Opus track, each preceded by its length (2 bytes, big-endian):
        all of them or none (429 when they do not fit now, 422 for bad framing or a bad packet)."""
        from telecom import OpusPipe

        entry = self._pipe_track(request, (OpusPipe,), "an Opus track (create one with {\"opus\": true})")
        pipe = entry.playable
        try:
            packets = split_length_prefixed(await request.read())
        except ValueError as exc:
            raise ApiError(422, str(exc)) from None
        if pipe.state in ("stopped", "ended") or entry.input_closed:
            raise ApiError(409, "this Opus track has ended or its input was closed")
        free = pipe.capacity - pipe.buffered
        if len(packets) > free:
            raise ApiError(429, f"the track's queue holds {pipe.buffered} of {pipe.capacity} packets; "
                                f"{len(packets)} more do not fit: retry when it has played some")
        try:
            # Validates every packet before it queues any; all fit, as only the engine (draining) ran
            # since the check above.
            taken = pipe.send_many(packets)
        except CodecError as exc:
            raise ApiError(422, str(exc)) from None
        except TelecomError as exc:          # ended between the check and the push
            raise ApiError(409, str(exc)) from None
        return web.json_response({"queued": taken, "buffered": pipe.buffered, "capacity": pipe.capacity})

    async def post_pipe_end(self, request: web.Request) -> web.Response:
        """No more PCM or packets: what is buffered plays out, then the track ends (idempotent)."""
        from telecom import OpusPipe, PcmPipe

        entry = self._pipe_track(request, (PcmPipe, OpusPipe), "a PCM or Opus track")
        entry.input_closed = True
        entry.playable.close()
        return web.Response(status=204)

    async def delete_track(self, request: web.Request) -> web.Response:
        player, entry = self._track(request)
        entry.playable.stop()
        player.tracks.pop(str(entry.playable.id), None)
        return web.Response(status=204)

    # -- recordings -----------------------------------------------------------------------------------
    async def post_recording(self, request: web.Request) -> web.Response:
        from telecom.output import Output

        player = self._player(request)
        body = await self._json(request)
        _only(body, {"user_id", "mix", "format"}, "recording")
        mix = _bool(body, "mix") or False
        fmt = _string(body, "format", max_len=8) or "wav"
        if fmt not in RECORDING_FORMATS:
            raise ApiError(422, f"format must be one of {', '.join(RECORDING_FORMATS)}")
        user_id = None if body.get("user_id") is None else snowflake(body["user_id"], "user_id")
        if mix == (user_id is not None):
            raise ApiError(422, "a recording is of one user_id or the whole channel (mix: true)")
        client = player.client
        if client is None:
            raise ApiError(409, "this player has no voice connection")
        busy = [r for r in player.recordings.values() if r.user_id == user_id and r.stopped is None]
        if busy:
            raise ApiError(409, f"recording {busy[0].id} of this {'channel' if mix else 'user'} is running")
        rid = secrets.token_hex(6)
        name = f"{player.guild_id}-{'mix' if mix else user_id}-{int(time.time())}-{rid}.{fmt}"
        path = safe_child(self.recordings_dir, name)
        output = Output.to_file(path)
        muxer = None
        if mix:
            muxer = Output.muxer()
            muxer.set_output(output)
            client.set_output_muxer(muxer)
        else:
            client.get_user(user_id).set_output(output)
        rec = Recording(rid, name, user_id, output, muxer)
        player.recordings[rid] = rec
        return web.json_response(rec.to_json(), status=201)

    def stop_recording(self, player: Player, rec: Recording) -> None:
        if rec.stopped is not None:
            return
        rec.stopped = time.time()
        client = player.client
        try:
            if client is not None and rec.muxer is not None:
                client.set_output_muxer(None)
            elif client is not None:
                client.get_user(rec.user_id).set_output(None)
        except TelecomError:
            pass  # the client is closing: it closes its outputs itself
        if rec.muxer is not None:
            rec.muxer.close()
        rec.output.close()

    async def delete_recording(self, request: web.Request) -> web.Response:
        player = self._player(request)
        rec = player.recordings.get(request.match_info["rid"])
        if rec is None:
            raise ApiError(404, "no such recording on this player")
        assert self.loop is not None
        await self.loop.run_in_executor(None, self.stop_recording, player, rec)
        player.recordings.pop(rec.id, None)
        return web.json_response(rec.to_json())

    async def list_recordings(self, request: web.Request) -> web.Response:
        out = []
        running = {r.name for s in self.sessions.values() for p in s.players.values()
                   for r in p.recordings.values() if r.stopped is None}
        for entry in sorted(os.scandir(self.recordings_dir), key=lambda e: e.name):
            if entry.is_file() and not entry.name.startswith("."):
                st = entry.stat()
                out.append({"file": entry.name, "bytes": st.st_size, "modified": st.st_mtime,
                            "recording": entry.name in running})
        return web.json_response(out)

    async def download_recording(self, request: web.Request) -> web.StreamResponse:
        try:
            path = safe_child(self.recordings_dir, request.match_info["name"])
        except ConfigurationError as exc:
            raise ApiError(400, str(exc)) from None
        if not os.path.isfile(path):
            raise ApiError(404, "no such recording")
        return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


async def start_node(config: ServerConfig) -> tuple[Node, web.AppRunner, int]:
    """Start a node on the running loop; returns it, its runner and the bound port."""
    node = Node(config)
    runner = web.AppRunner(node.make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    port = runner.addresses[0][1]
    log.info("telecom-server listening on http://%s:%d%s", config.host, port, API)
    return node, runner, port
