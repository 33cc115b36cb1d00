"""RemoteClient and NodePool: telecom's Client API over telecom-server nodes.

What it owns: :class:`Node` (one node's REST + events websocket, with session resume and health checks),
:class:`RemoteClient` (the :class:`telecom.Client` API — ``set_server_info``, ``wait_ready``/``ready``,
``play``, ``set_volume``, ``get_user(id).set_output(...)``, ``on``/``events``, ``stats``, ``close`` —
for a voice connection held by a node), :class:`RemotePlayable` / :class:`RemoteOutput` (what such a
client plays and records, node side), and :class:`NodePool` (least-loaded placement, dead-node
detection and moving connections to live nodes, replaying what was playing).

Threading: everything network-bound runs on one asyncio loop in a daemon thread of its own
("telecom-remote"), not on telecom's io loop — a process that only drives nodes never starts the media
engine. Public methods are thread-safe; ``play``, ``stats`` and the output methods wait for the node's
answer (a loopback/LAN round trip) so their errors are raised to the caller; ``set_server_info``,
``set_volume`` and ``close`` return at once and report failures as ``error`` events. Callbacks run on
the remote thread; ``async for ev in client.events()`` delivers on the caller's loop.

What it must not do: touch audio (the nodes do), or block the remote loop in a callback.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import logging
import threading
import time
from typing import Any, Callable, Iterable

import aiohttp

from telecom._framing import pack_length_prefixed
from telecom.errors import (BufferFull, ClientClosed, CodecError, ConfigurationError, ConnectTimeout,
                            TelecomError)
from telecom.events import Event, EventEmitter

log = logging.getLogger("telecom.remote")



class RemoteError(TelecomError, ConnectionError):
    """A node refused a request (``status``, ``body``: its JSON error) or could not be reached."""

    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


# Events of a RemoteClient or a NodePool (the same value as telecom.Client's events).
RemoteEvent = Event


# -- the remote thread ---------------------------------------------------------------------------------
class _RemoteLoop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="telecom-remote", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Any) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Any, timeout: float | None = 30.0) -> Any:
        if threading.current_thread() is self.thread:
            raise RuntimeError("blocking RemoteClient call made on the remote thread (from a callback)")
        return self.submit(coro).result(timeout)


_remote: _RemoteLoop | None = None
_remote_lock = threading.Lock()


def _loop() -> _RemoteLoop:
    global _remote
    with _remote_lock:
        if _remote is None:
            _remote = _RemoteLoop()
        return _remote


class _Emitter(EventEmitter):
    """Events of the remote objects: callbacks run on the ``telecom-remote`` thread that emits them."""


# -- one node ----------------------------------------------------------------------------------------------
class Node:
    """A connection to one telecom-server: REST calls, the events websocket (resumed after a drop), stats.

    The node is declared dead when its websocket is gone and ``health_failures`` health checks in a row
    (``GET /v1/info``, ``health_timeout`` each, ``health_interval`` apart) fail. In a :class:`NodePool` a
    dead node (or one unreachable when the pool started) is probed every ``readmit_interval`` seconds
    and re-admitted with a fresh session when it answers.
    """

    def __init__(self, url: str, password: str | None = None, *, name: str | None = None,
                 resume_timeout: float = 30.0, health_interval: float = 0.25, health_timeout: float = 1.0,
                 health_failures: int = 2) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"node url must be http(s)://host:port, not {url!r}")
        self.url = url.rstrip("/")
        self.password = password
        self.name = name or self.url
        self.resume_timeout = resume_timeout
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.health_failures = health_failures
        self.session_id: str | None = None
        self.alive = False
        self.last_stats: dict = {}
        self.prev_stats: tuple[float, dict] | None = None
        self.clients: dict[int, "RemoteClient"] = {}      # guild id -> client on this node
        self.on_dead: Callable[["Node"], None] | None = None
        self.on_up: Callable[["Node"], None] | None = None
        self.readmit_interval: float | None = None     # set by a NodePool: probe a dead node this often
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    def __repr__(self) -> str:
        return f"<Node {self.name} alive={self.alive} clients={len(self.clients)}>"

    # -- lifecycle (remote loop) ---------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> "Node":
        _loop().run(self._start(), timeout)
        return self

    def _ensure_http(self) -> None:
        if self._http is None:
            headers = {"Authorization": self.password} if self.password else {}
            self._http = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=15))

    async def _start(self) -> None:
        self._ensure_http()
        await self._open_ws(resume=False)
        await self.request("PATCH", f"/v1/sessions/{self.session_id}",
                           {"resuming": True, "timeout": self.resume_timeout})
        self.alive = True
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _open_ws(self, resume: bool) -> bool:
        assert self._http is not None
        headers = {"Session-Id": self.session_id} if resume and self.session_id else {}
        ws = await self._http.ws_connect(self.url + "/v1/websocket", headers=headers, heartbeat=10.0)
        ready = await ws.receive_json(timeout=10)
        if ready.get("op") != "ready":
            raise RemoteError(f"{self.name}: expected ready, got {ready!r}")
        self.session_id = ready["session_id"]
        self._ws = ws
        return bool(ready.get("resumed"))

    async def _run(self) -> None:
        while not self._closing:
            ws = self._ws
            if ws is not None:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        self._handle(json.loads(msg.data))
                self._ws = None
            if self._closing:
                return
            log.warning("%s: websocket lost; checking health", self.name)
            if await self._recover():
                continue
            self.alive = False
            log.error("%s: node is down", self.name)
            if self.on_dead is not None:
                self.on_dead(self)
            else:
                for client in list(self.clients.values()):
                    client._emit("disconnect", code=None, action="node_down", node=self.name)
            if self.readmit_interval is None or not await self._readmit():
                return

    async def _readmit(self) -> bool:
        """Probe a dead node every ``readmit_interval`` until it answers, then start a fresh session
        (its old one died with it). False when the node is closed meanwhile."""
        assert self.readmit_interval is not None
        while not self._closing:
            await asyncio.sleep(self.readmit_interval)
            try:
                await self.request("GET", "/v1/info", timeout=self.health_timeout)
                await self._open_ws(resume=False)
                await self.request("PATCH", f"/v1/sessions/{self.session_id}",
                                   {"resuming": True, "timeout": self.resume_timeout})
            except (aiohttp.ClientError, asyncio.TimeoutError, RemoteError, OSError) as exc:
                log.debug("%s: still down (%s)", self.name, exc)
                ws, self._ws = self._ws, None
                if ws is not None:
                    await ws.close()
                continue
            if self._closing:
                return False
            # What was here was moved (or told it is disconnected) when the node died.
            for guild, client in list(self.clients.items()):
                if client.node is not self or client._closed:
                    self.clients.pop(guild, None)
            self.last_stats, self.prev_stats = {}, None
            self.alive = True
            log.warning("%s: node is back", self.name)
            if self.on_up is not None:
                self.on_up(self)
            return True
        return False

    async def _admit_later(self) -> None:
        """A node that was unreachable when its pool started: admit it once it answers."""
        self._task = asyncio.current_task()   # close() cancels the probing
        self._ensure_http()
        if await self._readmit():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _recover(self) -> bool:
        failures = 0
        while failures < self.health_failures and not self._closing:
            try:
                await self.request("GET", "/v1/info", timeout=self.health_timeout)
                resumed = await self._open_ws(resume=True)
                if not resumed:
                    # The node forgot us (restarted or the session expired): its players are gone.
                    for client in list(self.clients.values()):
                        client._emit("disconnect", code=None, action="session_lost", node=self.name)
                    await self.request("PATCH", f"/v1/sessions/{self.session_id}",
                                       {"resuming": True, "timeout": self.resume_timeout})
                return True
            except (aiohttp.ClientError, asyncio.TimeoutError, RemoteError, OSError):
                failures += 1
                await asyncio.sleep(self.health_interval)
        return False

    def _handle(self, message: dict) -> None:
        op = message.get("op")
        if op == "stats":
            now = time.monotonic()
            if self.last_stats:
                self.prev_stats = (self._stats_at, self.last_stats)
            self.last_stats, self._stats_at = message, now
        elif op == "event":
            guild = int(message.get("guild_id", 0) or 0)
            client = self.clients.get(guild)
            if client is not None:
                client._node_event(message)

    async def request(self, method: str, path: str, body: Any = None, timeout: float | None = None,
                      data: bytes | None = None) -> Any:
        """A REST call: ``body`` goes as JSON, or ``data`` as application/octet-stream."""
        assert self._http is not None
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs["json"] = body
        if data is not None:
            kwargs["data"] = data
            kwargs["headers"] = {"Content-Type": "application/octet-stream"}
        if timeout is not None:
            kwargs["timeout"] = aiohttp.ClientTimeout(total=timeout)
        async with self._http.request(method, self.url + path, **kwargs) as resp:
            if resp.status == 204:
                return None
            if resp.content_type == "application/json":
                data = await resp.json()
            else:
                data = await resp.read()
            if resp.status >= 400:
                message = data.get("message") if isinstance(data, dict) else str(data)[:200]
                raise RemoteError(f"{self.name}: {method} {path}: {resp.status} {message}", resp.status, data)
            return data

    def call(self, method: str, path: str, body: Any = None, timeout: float = 30.0,
             data: bytes | None = None) -> Any:
        """A blocking REST call (from any thread but the remote one)."""
        return _loop().run(self.request(method, path, body, data=data), timeout)

    def close(self) -> None:
        _loop().run(self._close(), 10)

    async def _close(self) -> None:
        self._closing = True
        self.alive = False
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
        if self._http is not None:
            await self._http.close()

    # -- load ------------------------------------------------------------------------------------------
    def load(self) -> float:
        """Placement score (lower is better): connections, playing ones, CPU and recent frame deficit."""
        s = self.last_stats
        players = max(int(s.get("players", 0)), len(self.clients))
        local_playing = sum(1 for c in self.clients.values() if c._playing())
        playing = max(int(s.get("playing_players", 0)), local_playing)
        cpu = float((s.get("cpu") or {}).get("process_load", 0.0))
        deficit_rate = 0.0
        if self.prev_stats is not None and s:
            then, old = self.prev_stats
            dt = max(self._stats_at - then, 1e-3)
            deficit_rate = max(0, s["frames"]["deficit"] - old["frames"]["deficit"]) / dt
        return players + 2.0 * playing + 50.0 * cpu + deficit_rate


# -- what a remote client plays and records -----------------------------------------------------------------
class RemotePlayable:
    """A track a node plays: from a URL (the node's URL policy applies) or a file under its media root."""

    _ids = itertools.count(1)

    def __init__(self, source: dict, volume: float = 100.0) -> None:
        self.source = source
        self.local_id = next(self._ids)
        self.track_id: str | None = None
        self._client: RemoteClient | None = None
        self._volume = float(volume)
        self._state = "new"
        self._paused = False
        self._pos_base = 0.0          # position estimate: base + (now - since) while playing
        self._since: float | None = None
        self.end_reason: str | None = None
        self.error: str | None = None
        self.done: concurrent.futures.Future = concurrent.futures.Future()

    @staticmethod
    def from_url(url: str, *, volume: float = 100.0) -> "RemotePlayable":
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"url must be http(s), not {url!r}")
        return RemotePlayable({"url": url}, volume)

    @staticmethod
    def from_file(name: str, *, volume: float = 100.0) -> "RemotePlayable":
        """``name`` is relative to the node's media root."""
        if not isinstance(name, str) or not name:
            raise ConfigurationError("file name must be a non-empty string")
        return RemotePlayable({"file": name}, volume)

    @staticmethod
    def from_pcm_pipe(*, buffer_seconds: float = 10.0, volume: float = 100.0) -> "RemotePcmPipe":
        """A track you push raw 48 kHz s16le stereo PCM into with :meth:`RemotePcmPipe.send`."""
        return RemotePcmPipe(buffer_seconds=buffer_seconds, volume=volume)

    @staticmethod
    def from_opus_pipe(*, buffer_seconds: float = 10.0, volume: float = 100.0) -> "RemoteOpusPipe":
        """A track you push ready 20 ms Opus packets into with :meth:`RemoteOpusPipe.send_many`."""
        return RemoteOpusPipe(buffer_seconds=buffer_seconds, volume=volume)

    @property
    def id(self) -> str | None:
        return self.track_id

    @property
    def state(self) -> str:
        return self._state

    @property
    def volume(self) -> float:
        return self._volume

    @property
    def position(self) -> float:
        """Seconds played, estimated locally from the node's events (exact: :meth:`stats`)."""
        if self._since is not None and not self._paused and self._state == "playing":
            return self._pos_base + time.monotonic() - self._since
        return self._pos_base

    def _client_or_fail(self) -> "RemoteClient":
        if self._client is None or self.track_id is None:
            raise ConfigurationError("this playable is not playing on a client")
        return self._client

    def _patch(self, body: dict) -> dict:
        client = self._client_or_fail()
        return client._call("PATCH", f"{client._player_path}/tracks/{self.track_id}", body)

    def pause(self) -> None:
        pos = self.position
        self._patch({"paused": True})
        self._paused, self._pos_base, self._since = True, pos, None

    def resume(self) -> None:
        self._patch({"paused": False})
        self._paused, self._since = False, time.monotonic()

    def seek(self, seconds: float) -> None:
        self._patch({"position": seconds})
        self._pos_base, self._since = float(seconds), time.monotonic()

    def set_volume(self, percent: float) -> None:
        self._patch({"volume": percent})
        self._volume = float(percent)

    def stop(self) -> None:
        client = self._client_or_fail()
        self.end_reason = "stopped"
        try:
            client._call("DELETE", f"{client._player_path}/tracks/{self.track_id}")
        except RemoteError as exc:
            if exc.status != 404:
                raise

    def stats(self) -> dict:
        client = self._client_or_fail()
        return client._call("GET", f"{client._player_path}/tracks/{self.track_id}")

    def _spec(self) -> dict:
        body = dict(self.source)
        body["volume"] = self._volume
        pos = self.position
        if pos > 0.05:
            body["position"] = round(pos, 3)
        if self._paused:
            body["paused"] = True
        return body

    def _ended(self, reason: str, error: Any = None) -> None:
        self._state = "ended" if reason == "finished" else "stopped"
        self.end_reason = self.end_reason or reason
        self._pos_base = self.position
        self._since = None
        if not self.done.done():
            self.done.set_result(self._state)

    def __repr__(self) -> str:
        return f"<RemotePlayable {self.source} id={self.track_id} state={self._state}>"


class _RemotePipe(RemotePlayable):
    """A node track fed over HTTP (``{"pcm": true}`` or ``{"opus": true}``); see the two subclasses."""

    MAX_SEND = 16 * 3840

    def __init__(self, kind: str, buffer_seconds: float, volume: float) -> None:
        if not 0.1 <= buffer_seconds <= 60:
            raise ConfigurationError("buffer_seconds must be between 0.1 and 60")
        super().__init__({kind: True, "buffer_seconds": buffer_seconds}, volume)
        self._kind = kind

    def _push(self, body: bytes) -> None:
        client = self._client_or_fail()
        try:
            client.node.call("POST", f"{client._player_path}/tracks/{self.track_id}/{self._kind}", data=body)
        except RemoteError as exc:
            if exc.status == 429:
                raise BufferFull(str(exc)) from None
            raise

    def close(self) -> None:
        """No more input: what the node has buffered plays out, then the track ends."""
        client = self._client_or_fail()
        client._call("POST", f"{client._player_path}/tracks/{self.track_id}/end")

    def _spec(self) -> dict:
        body = super()._spec()
        body.pop("position", None)        # a pipe has no position to resume from
        return body


class RemotePcmPipe(_RemotePipe):
    """Raw PCM pushed to the node (``POST .../tracks/{id}/pcm``) after ``client.play(pipe)``.

    Like :class:`~telecom.PcmPipe`: :meth:`send` takes all of the data or none of it and raises
    :class:`~telecom.BufferFull` when the node's buffer (``buffer_seconds``) has no room now; :meth:`close`
    plays out what is buffered, then the track ends. One call carries at most ``MAX_SEND`` bytes (the
    node's default body limit is 64 KiB). If the pool moves the connection to another node, the track
    restarts there empty: what was buffered on the dead node is lost.
    """

    def __init__(self, *, buffer_seconds: float = 10.0, volume: float = 100.0) -> None:
        super().__init__("pcm", buffer_seconds, volume)

    def send(self, data: bytes | bytearray | memoryview) -> None:
        chunk = bytes(memoryview(data).cast("B"))
        if len(chunk) > self.MAX_SEND:
            raise ConfigurationError(f"send at most {self.MAX_SEND} bytes per call, not {len(chunk)}")
        if len(chunk) % 4:
            raise ConfigurationError(f"{len(chunk)} bytes is not a whole number of stereo s16 samples")
        if chunk:
            self._push(chunk)


class RemoteOpusPipe(_RemotePipe):
    """Ready 20 ms Opus packets pushed to the node (``POST .../tracks/{id}/opus``) after
    ``client.play(pipe)``. Alone on its connection and at 100 % volume, the node sends them as they are.

    Like :class:`~telecom.OpusPipe`, except that :meth:`send_many` takes all of the packets or none:
    :class:`~telecom.BufferFull` when the node's queue (``buffer_seconds``) has no room for them now,
    :class:`~telecom.CodecError` (nothing queued) when one is not a 20 ms Opus packet. One call carries
    at most ``MAX_SEND`` bytes, counting 2 bytes of length per packet (the node's default body limit is
    64 KiB). If the pool moves the connection to another node, the track restarts there empty.
    """

    def __init__(self, *, buffer_seconds: float = 10.0, volume: float = 100.0) -> None:
        super().__init__("opus", buffer_seconds, volume)

    def send(self, packet: bytes | bytearray | memoryview) -> None:
        self.send_many([packet])

    def send_many(self, packets: Iterable[bytes | bytearray | memoryview]) -> None:
        try:
            body = pack_length_prefixed(bytes(memoryview(p).cast("B")) for p in packets)
        except ValueError as exc:
            raise CodecError(str(exc)) from None
        if len(body) > self.MAX_SEND:
            raise ConfigurationError(f"send at most {self.MAX_SEND} bytes of framed packets per call, "
                                     f"not {len(body)}")
        if not body:
            return
        try:
            self._push(body)
        except RemoteError as exc:
            if exc.status == 422:
                raise CodecError(str(exc)) from None
            raise


class RemoteOutput:
    """A node-side recording target: a file in the node's recordings dir (download it with
    :meth:`RemoteClient.download`). ``files`` lists every file it wrote (a move starts a new one)."""

    def __init__(self, format: str = "wav", mix: bool = False) -> None:
        if format not in ("wav", "flac", "ogg", "opus", "mp3"):
            raise ConfigurationError(f"unsupported recording format {format!r}")
        self.format = format
        self.mix = mix
        self.recording_id: str | None = None
        self.files: list[str] = []
        self.user_id: int | None = None

    @staticmethod
    def to_file(format: str = "wav") -> "RemoteOutput":
        return RemoteOutput(format)

    @staticmethod
    def muxer(format: str = "wav") -> "RemoteOutput":
        return RemoteOutput(format, mix=True)

    @property
    def file(self) -> str | None:
        return self.files[-1] if self.files else None

    def _body(self) -> dict:
        body: dict[str, Any] = {"format": self.format}
        if self.mix:
            body["mix"] = True
        else:
            body["user_id"] = str(self.user_id)
        return body


class RemoteUser:
    def __init__(self, client: "RemoteClient", user_id: int) -> None:
        self._client = client
        self.id = user_id

    def set_output(self, output: RemoteOutput | None) -> RemoteOutput | None:
        """Record this user on the node (``RemoteOutput.to_file()``); None stops the recording."""
        return self._client._set_output(self.id, output)


# -- the client ----------------------------------------------------------------------------------------------
def _snowflake(value: Any, what: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{what} must be a snowflake, not {value!r}") from None
    if not 0 < number < 2**64:
        raise ConfigurationError(f"{what} {value!r} is out of range")
    return number


class RemoteClient(_Emitter):
    """:class:`telecom.Client`'s API for a voice connection held by a node (or placed by a
    :class:`NodePool`)::

        client = RemoteClient(user_id, guild_id, session_id, channel_id=cid, node=node)   # or pool=pool
        client.set_server_info(endpoint, token)
        client.wait_ready(10)
        track = client.play(RemotePlayable.from_url("https://example.com/a.ogg"))
        client.get_user(uid).set_output(RemoteOutput.to_file("wav"))
    """

    def __init__(self, user_id: int | str, guild_id: int | str, session_id: str,
                 channel_id: int | str | None = None, *, node: Node | None = None,
                 pool: "NodePool | None" = None) -> None:
        super().__init__()
        self.user_id = _snowflake(user_id, "user_id")
        self.guild_id = _snowflake(guild_id, "guild_id")
        if not isinstance(session_id, str) or not session_id:
            raise ConfigurationError("session_id must be a non-empty string")
        self.session_id = session_id
        self.channel_id = None if channel_id is None else _snowflake(channel_id, "channel_id")
        if (node is None) == (pool is None):
            raise ConfigurationError("a RemoteClient needs exactly one of node= or pool=")
        self.pool = pool
        self._endpoint: str | None = None
        self._token: str | None = None
        self._volume = 100.0
        self._ready = threading.Event()
        self._error: Any = None
        self._state = "idle"
        self._closed = False
        self._playables: dict[str, RemotePlayable] = {}
        self._outputs: dict[int | None, RemoteOutput] = {}
        self.moves = 0
        # placed last: from here on the pool's load figures (other threads) may look at this client
        self.node: Node = pool._place(self) if pool is not None else node  # type: ignore[assignment]
        self.node.clients[self.guild_id] = self

    @property
    def _player_path(self) -> str:
        return f"/v1/sessions/{self.node.session_id}/players/{self.guild_id}"

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        return self.node.call(method, path, body)

    def _voice(self) -> dict:
        voice = {"user_id": str(self.user_id), "session_id": self.session_id,
                 "endpoint": self._endpoint, "token": self._token}
        if self.channel_id is not None:
            voice["channel_id"] = str(self.channel_id)
        return voice

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("this client is closed")

    # -- connection --------------------------------------------------------------------------------
    def set_server_info(self, endpoint: str, token: str, channel_id: int | str | None = None) -> None:
        """Send the voice credentials to the node (returns at once; failures are ``error`` events)."""
        self._check_open()
        if not isinstance(endpoint, str) or not endpoint or not isinstance(token, str) or not token:
            raise ConfigurationError("endpoint and token must be non-empty strings")
        if channel_id is not None:
            self.channel_id = _snowflake(channel_id, "channel_id")
        self._endpoint, self._token = endpoint, token
        self._ready.clear()
        self._error = None
        _loop().submit(self._send_voice())

    async def _send_voice(self) -> None:
        try:
            await self.node.request("PATCH", self._player_path, {"voice": self._voice(), "volume": self._volume})
        except (RemoteError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self._error = exc
            self._ready.set()
            self._emit("error", error=str(exc))

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the node reports the voice connection ready (raises its error, or ConnectTimeout)."""
        if not self._ready.wait(timeout):
            raise ConnectTimeout(f"the node did not report the connection ready within {timeout} s")
        if self._error is not None:
            raise self._error if isinstance(self._error, BaseException) else RemoteError(str(self._error))

    async def ready(self, timeout: float | None = None) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.wait_ready, timeout)

    @property
    def state(self) -> str:
        return self._state

    # -- events from the node (remote loop) -------------------------------------------------------------
    def _node_event(self, message: dict) -> None:
        name = message.get("type", "")
        data = {k: v for k, v in message.items() if k not in ("op", "type")}
        if name == "ready":
            self._state = "connected"
            self._error = None
            self._ready.set()
        elif name == "state":
            self._state = data.get("state", self._state)
        elif name == "disconnect":
            self._state = "disconnected"
            self._error = RemoteError(f"voice connection closed (code {data.get('code')})")
            self._ready.set()
        elif name in ("track_start", "track_end"):
            playable = self._playables.get(str(data.get("track_id")))
            if playable is not None:
                data["playable"] = playable
                if name == "track_end":
                    if data.get("reason") == "replaced" and playable._state == "moving":
                        return  # our own stop during a move
                    playable._ended(str(data.get("reason", "finished")), data.get("error"))
                    self._playables.pop(playable.track_id or "", None)
        elif name == "track_error":
            playable = self._playables.get(str(data.get("track_id")))
            if playable is not None:
                data["playable"] = playable
                playable.error = data.get("error")
        self._emit(name, **data)

    # -- playing -----------------------------------------------------------------------------------
    def play(self, playable: RemotePlayable, *, replace: bool = False) -> RemotePlayable:
        """Have the node play ``playable`` (waits for the node to accept it; its errors are raised)."""
        self._check_open()
        if not isinstance(playable, RemotePlayable):
            raise ConfigurationError(f"play() takes a RemotePlayable, not {type(playable).__name__}")
        if playable._state in ("ended", "stopped"):
            raise ConfigurationError("this playable has already ended; create a new one")
        self._start_track(playable, replace, lambda m, p, b: self._call(m, p, b))
        if replace:
            for other in list(self._playables.values()):
                if other is not playable:
                    other._ended("replaced")
            self._playables = {k: v for k, v in self._playables.items() if v is playable}
        return playable

    def _start_track(self, playable: RemotePlayable, replace: bool, call: Callable) -> Any:
        body = playable._spec()
        body["replace"] = replace
        answer = call("POST", f"{self._player_path}/tracks", body)
        return self._track_started(playable, answer)

    def _track_started(self, playable: RemotePlayable, answer: dict) -> RemotePlayable:
        playable.track_id = str(answer["id"])
        playable._client = self
        playable._state = "paused" if playable._paused else "playing"
        playable._since = time.monotonic()
        self._playables[playable.track_id] = playable
        return playable

    def _playing(self) -> bool:
        return any(p._state == "playing" for p in self._playables.values())

    @property
    def playables(self) -> list[RemotePlayable]:
        return list(self._playables.values())

    def stop(self) -> None:
        for p in self.playables:
            p.stop()

    def set_volume(self, percent: float) -> None:
        """Connection volume in percent (0..200) on the node (returns at once)."""
        self._check_open()
        if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 <= percent <= 200:
            raise ConfigurationError(f"volume must be a percentage in 0..200, not {percent!r}")
        self._volume = float(percent)
        _loop().submit(self._quiet("PATCH", self._player_path, {"volume": self._volume}))

    async def _quiet(self, method: str, path: str, body: Any = None) -> None:
        try:
            await self.node.request(method, path, body)
        except (RemoteError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self._emit("error", error=str(exc))

    @property
    def volume(self) -> float:
        return self._volume

    # -- recording -----------------------------------------------------------------------------------
    def get_user(self, user_id: int | str) -> RemoteUser:
        return RemoteUser(self, _snowflake(user_id, "user_id"))

    def _set_output(self, user_id: int | None, output: RemoteOutput | None) -> RemoteOutput | None:
        self._check_open()
        old = self._outputs.pop(user_id, None)
        if old is not None and old.recording_id is not None:
            try:
                self._call("DELETE", f"{self._player_path}/recordings/{old.recording_id}")
            except RemoteError as exc:
                if exc.status != 404:
                    raise
            old.recording_id = None
        if output is None:
            return None
        if not isinstance(output, RemoteOutput):
            raise ConfigurationError(f"set_output() takes a RemoteOutput or None, not {type(output).__name__}")
        output.user_id = user_id
        answer = self._call("POST", f"{self._player_path}/recordings", output._body())
        output.recording_id = answer["id"]
        output.files.append(answer["file"])
        self._outputs[user_id] = output
        return output

    def set_output_muxer(self, output: RemoteOutput | None) -> RemoteOutput | None:
        """Record everyone in the channel, mixed, on the node (``RemoteOutput.muxer()``); None stops."""
        if output is not None and not output.mix:
            raise ConfigurationError("set_output_muxer() takes RemoteOutput.muxer()")
        return self._set_output(None, output)

    def download(self, name: str) -> bytes:
        """A recording file's bytes, from the node that holds this client now."""
        return self._call("GET", f"/v1/recordings/{name}")

    # -- stats, close ---------------------------------------------------------------------------------
    def stats(self) -> dict:
        """The node's view of this connection: state, volume, tracks, recordings and the
        ``telecom.Client.stats()`` counters (frames_sent, late, underruns, ...), plus ``node``."""
        state = self._call("GET", self._player_path)
        state["node"] = self.node.name
        state["moves"] = self.moves
        return state

    def close(self) -> None:
        """Remove the player on the node (returns at once; idempotent)."""
        if self._closed:
            return
        self._closed = True
        node = self.node
        node.clients.pop(self.guild_id, None)
        if self.pool is not None:
            self.pool._forget(self)
        if node.alive:
            _loop().submit(self._quiet("DELETE", self._player_path))
        self._emit("closed")

    def __enter__(self) -> "RemoteClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- moving (remote loop) ----------------------------------------------------------------------------
    async def _move_to(self, node: Node) -> None:
        old = self.node
        old.clients.pop(self.guild_id, None)
        self.node = node
        node.clients[self.guild_id] = self
        self._ready.clear()
        self._state = "moving"
        if self._endpoint is None:
            return
        await node.request("PATCH", self._player_path, {"voice": self._voice(), "volume": self._volume})
        for playable in list(self._playables.values()):
            self._playables.pop(playable.track_id or "", None)
            body = playable._spec()
            body["replace"] = False
            try:
                answer = await node.request("POST", f"{self._player_path}/tracks", body)
            except RemoteError as exc:
                playable._ended("error")
                self._emit("track_error", playable=playable, error=str(exc))
                continue
            playable._pos_base = float(body.get("position", 0.0))
            self._track_started(playable, answer)
        for output in list(self._outputs.values()):
            try:
                answer = await node.request("POST", f"{self._player_path}/recordings", output._body())
                output.recording_id = answer["id"]
                output.files.append(answer["file"])
            except RemoteError as exc:
                self._emit("error", error=f"recording not restarted on {node.name}: {exc}")
        self.moves += 1


# -- the pool ----------------------------------------------------------------------------------------------
class NodePool(_Emitter):
    """Several nodes: each new connection goes to the least-loaded live node (:meth:`Node.load`); when
    a node dies its connections are re-created on live nodes with the credentials the pool holds, and
    what was playing is replayed from where it was (URL/file tracks seek). Events: ``node_down``
    (``node``), ``node_up`` (``node``: a dead or initially unreachable node answers again and takes new
    connections; the ones moved off it stay where they are), ``connection_moved`` (``guild_id``,
    ``from_node``, ``to_node``, ``seconds``), ``move_failed``; each moved client also gets
    ``connection_moved``.
    """

    def __init__(self, nodes: Iterable[Node | tuple[str, str | None] | str], *,
                 readmit_interval: float = 2.0) -> None:
        super().__init__()
        if readmit_interval <= 0:
            raise ConfigurationError("readmit_interval must be > 0 seconds")
        self.nodes: list[Node] = []
        for spec in nodes:
            node = spec if isinstance(spec, Node) else (Node(*spec) if isinstance(spec, tuple) else Node(spec))
            node.on_dead = self._node_dead
            node.on_up = self._node_up
            node.readmit_interval = readmit_interval
            self.nodes.append(node)
        if not self.nodes:
            raise ConfigurationError("a NodePool needs at least one node")
        self._lock = threading.Lock()
        self.clients: list[RemoteClient] = []

    def start(self, timeout: float = 10.0) -> "NodePool":
        for node in self.nodes:
            try:
                node.start(timeout)
            except (aiohttp.ClientError, RemoteError, OSError, asyncio.TimeoutError,
                    concurrent.futures.TimeoutError) as exc:
                log.warning("node %s not reachable at start: %s", node.name, exc)
        if not self.live_nodes():
            raise RemoteError("no node of the pool is reachable")
        for node in self.nodes:
            if not node.alive:
                _loop().submit(node._admit_later())
        return self

    def live_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.alive]

    def _place(self, client: RemoteClient, exclude: Node | None = None) -> Node:
        with self._lock:
            live = [n for n in self.live_nodes() if n is not exclude]
            if not live:
                raise RemoteError("no live node to place the connection on")
            node = min(live, key=lambda n: (n.load(), self.nodes.index(n)))
            node.clients[client.guild_id] = client   # counts at once for the next placement
            if client not in self.clients:
                self.clients.append(client)
            return node

    def _forget(self, client: RemoteClient) -> None:
        with self._lock:
            if client in self.clients:
                self.clients.remove(client)

    def client(self, user_id: int | str, guild_id: int | str, session_id: str,
               channel_id: int | str | None = None) -> RemoteClient:
        """A RemoteClient placed on the least-loaded node."""
        return RemoteClient(user_id, guild_id, session_id, channel_id, pool=self)

    def placement(self) -> dict[str, int]:
        return {n.name: len(n.clients) for n in self.nodes}

    def _node_up(self, node: Node) -> None:
        # remote loop
        self._emit("node_up", node=node.name)

    def _node_dead(self, node: Node) -> None:
        # remote loop
        died = time.monotonic()
        self._emit("node_down", node=node.name)
        asyncio.get_running_loop().create_task(self._evacuate(node, died))

    async def _evacuate(self, node: Node, died: float) -> None:
        # All of the dead node's connections at once: each move is a few REST calls to another node.
        clients = [c for c in list(node.clients.values()) if not c._closed]
        await asyncio.gather(*(self._move(client, node, died) for client in clients))

    async def _move(self, client: RemoteClient, node: Node, died: float) -> None:
        try:
            target = self._place(client, exclude=node)
            await client._move_to(target)
        except (RemoteError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.error("moving guild %s off %s failed: %s", client.guild_id, node.name, exc)
            self._emit("move_failed", guild_id=client.guild_id, node=node.name, error=str(exc))
            client._emit("disconnect", code=None, action="node_down", node=node.name, error=str(exc))
            return
        seconds = time.monotonic() - died
        data = dict(guild_id=client.guild_id, from_node=node.name, to_node=target.name, seconds=seconds)
        client._emit("connection_moved", **data)
        self._emit("connection_moved", **data)

    def close(self) -> None:
        for client in list(self.clients):
            client.close()
        for node in self.nodes:
            try:
                node.close()
            except Exception:  # noqa: BLE001 - closing a dead node's session is best effort
                log.debug("closing %s", node.name, exc_info=True)


__all__ = ["Node", "NodePool", "RemoteClient", "RemoteError", "RemoteEvent", "RemoteOpusPipe", "RemoteOutput",
           "RemotePcmPipe", "RemotePlayable"]
