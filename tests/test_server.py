"""telecom-server over HTTP: a node in a subprocess driving voice connections to the local voice server,
checked where users see it — the tone decoded at the voice server, a recording decoded after download,
JSON errors and status codes, the URL policy (resolved addresses and redirect hops), metrics."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from audio_checks import active_part, left_channel, peak_frequency, rms_db, stereo_tone
from conftest import new_ids
from media import MediaServer, tone_file

PASSWORD = "test-password"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NodeProcess:
    """``python -m telecom.server`` in a subprocess on a free port (killable, like a real node)."""

    def __init__(self, tmp: str, *extra: str, password: str | None = PASSWORD, port: int = 0) -> None:
        self.tmp = tmp
        self.ready_file = os.path.join(tmp, f"ready-{time.monotonic_ns()}")
        self.recordings = os.path.join(tmp, "recordings")
        self.media = os.path.join(tmp, "media")
        os.makedirs(self.media, exist_ok=True)
        args = [sys.executable, "-m", "telecom.server", "--port", str(port), "--recordings-dir", self.recordings,
                "--media-root", self.media, "--stats-interval", "0.5", "--media-threads", "1",
                "--ready-file", self.ready_file, *extra]
        args += ["--password", password] if password else ["--no-auth"]
        self.log_path = os.path.join(tmp, f"node-{time.monotonic_ns()}.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.ready_file):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node did not start: {open(self.log_path).read()[-3000:]}")
            time.sleep(0.05)
        self.port = int(open(self.ready_file).read())
        self.url = f"http://127.0.0.1:{self.port}"
        self.password = password

    def request(self, method: str, path: str, body=None, *, auth: str | None = "default", raw: bytes | None = None,
                headers: dict | None = None):
        """(status, parsed JSON or bytes)."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if auth == "default" and self.password:
            req.add_header("Authorization", self.password)
        elif auth not in (None, "default"):
            req.add_header("Authorization", auth)
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=20) as resp:
                status, payload, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            status, payload, ctype = exc.code, exc.read(), exc.headers.get("Content-Type", "")
        if "json" in ctype and payload:
            return status, json.loads(payload)
        return status, payload

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


class WsSession:
    """The events websocket, from a thread of its own (aiohttp client)."""

    def __init__(self, node: NodeProcess, user_id: int | None = None, session_id: str | None = None) -> None:
        import asyncio
        import threading

        import aiohttp

        self.messages: list[dict] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self._closed = threading.Event()
        headers = {"Authorization": node.password} if node.password else {}
        if user_id:
            headers["User-Id"] = str(user_id)
        if session_id:
            headers["Session-Id"] = session_id

        async def run() -> None:
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(node.url + "/v1/websocket", headers=headers) as ws:
                    self.ws = ws
                    async for msg in ws:
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            m = json.loads(msg.data)
                            self.messages.append(m)
                            if m.get("op") == "ready":
                                self.session_id = m["session_id"]
                                self.resumed = m["resumed"]
                                self.ready.set()

        self.thread = threading.Thread(target=lambda: self.loop.run_until_complete(run()), daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "no ready message"

    def events(self, kind: str | None = None) -> list[dict]:
        return [m for m in self.messages if m.get("op") == "event" and (kind is None or m["type"] == kind)]

    def wait_event(self, kind: str, timeout: float = 10.0, **match) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.events(kind):
                if all(str(m.get(k)) == str(v) for k, v in match.items()):
                    return m
            time.sleep(0.02)
        raise AssertionError(f"no {kind} event {match}: {self.events()[-10:]}")

    def close(self) -> None:
        import asyncio

        async def close() -> None:
            await self.ws.close()
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.thread.join(5)


@pytest.fixture(scope="module")
def tmp_root():
    with tempfile.TemporaryDirectory() as tmp:
        yield tmp


@pytest.fixture(scope="module")
def node(tmp_root):
    n = NodeProcess(tmp_root, "--allow", "127.0.0.1/32")
    yield n
    n.stop()


@pytest.fixture(scope="module")
def strict_node(tmp_root):
    """A node with the default URL policy (private ranges refused)."""
    os.makedirs(os.path.join(tmp_root, "strict"), exist_ok=True)
    n = NodeProcess(os.path.join(tmp_root, "strict"))
    yield n
    n.stop()


@pytest.fixture(scope="module")
def media(tmp_root):
    files = {"tone.ogg": open(tone_file(tmp_root, "opus", 2.0, 440.0), "rb").read(),
             "tone.wav": open(tone_file(tmp_root, "wav", 3.0, 660.0), "rb").read()}
    with MediaServer(files) as server:
        yield server


def voice_body(voice_server, guild, channel, user):
    creds = voice_server.create_session(guild, channel, user)
    return {"voice": {"user_id": str(user), "session_id": creds.session_id, "channel_id": str(channel),
                      "endpoint": voice_server.url, "token": creds.token}}


def ready_player(node, voice_server):
    """A websocket session and a player joined to the local voice server, ready: (ws, guild, user,
    player path)."""
    ws = WsSession(node)
    guild, channel, user = new_ids()
    path = f"/v1/sessions/{ws.session_id}/players/{guild}"
    assert node.request("PATCH", path, voice_body(voice_server, guild, channel, user))[0] == 200
    ws.wait_event("ready", guild_id=guild)
    return ws, guild, user, path


def wait_quiet(server, user, timeout=8.0):
    server.wait_for_sync(lambda: (ev := server.record(user).speaking_events) and ev[-1][1] == 0
                         and server.record(user).packets, timeout)


def test_url_track_is_heard_at_the_voice_server(node, media, voice_server):
    ws = WsSession(node)
    guild, channel, user = new_ids()
    path = f"/v1/sessions/{ws.session_id}/players/{guild}"
    status, player = node.request("PATCH", path, voice_body(voice_server, guild, channel, user))
    assert status == 200, player
    ws.wait_event("ready", guild_id=guild)
    status, player = node.request("PATCH", path, {"track": {"url": media.url("/f/tone.ogg")}, "volume": 50})
    assert status == 200, player
    [track] = player["tracks"]
    assert track["source"] == {"url": media.url("/f/tone.ogg")} and player["volume"] == 50
    start = ws.wait_event("track_start", guild_id=guild)
    end = ws.wait_event("track_end", timeout=10, guild_id=guild)
    assert start["track_id"] == end["track_id"] == track["id"] and end["reason"] == "finished"
    wait_quiet(voice_server, user)
    audio = active_part(left_channel(voice_server.record(user).pcm()))
    assert len(audio) > 48000
    assert peak_frequency(audio) == pytest.approx(440.0, abs=2.0)
    assert rms_db(audio) == pytest.approx(-9.03 - 6.02, abs=1.0)   # -6 dBFS sine at 50 % volume
    assert voice_server.violations(user) == []
    status, state = node.request("GET", path)
    assert state["stats"]["frames_sent"] >= 95 and state["state"] == "ready"
    status, _ = node.request("DELETE", path)
    assert status == 204
    assert node.request("GET", path)[0] == 404
    ws.close()


def pipe_track(node, voice_server, spec: dict):
    """A ready player with one pushed-input track (``spec``: pcm or opus): (ws, guild, user, player
    path, track path)."""
    ws, guild, user, path = ready_player(node, voice_server)
    status, track = node.request("POST", path + "/tracks", spec)
    kind = "pcm" if spec.get("pcm") else "opus"
    assert status == 201 and track["source"] == {kind: True}, track
    return ws, guild, user, path, f"{path}/tracks/{track['id']}"


def test_pcm_track_pushed_over_http_is_heard(node, voice_server):
    """A track with pcm: true, fed raw PCM in body-sized pieces (all or nothing, 429 when full),
    closed with /end: the voice server decodes the tone; bad pieces are refused with the reason."""
    ws, guild, user, path, tpath = pipe_track(node, voice_server, {"pcm": True, "buffer_seconds": 1.0})
    pcm = stereo_tone(1.5, 523.0)
    piece = 15 * 3840                                  # under the node's 64 KiB body limit
    full = 0
    for i in range(0, len(pcm), piece):
        while True:
            status, answer = node.request("POST", tpath + "/pcm", raw=pcm[i:i + piece],
                                          headers={"Content-Type": "application/octet-stream"})
            if status != 429:
                break
            full += 1                                  # 1 s buffer: wait for it to play some
            assert "do not fit" in answer["message"]
            time.sleep(0.05)
        assert status == 200, answer
        assert 0 < answer["buffered"] <= answer["capacity"] == 192000
    assert full > 0                                    # 1.5 s into a 1 s buffer had to wait
    status, answer = node.request("POST", tpath + "/pcm", raw=b"\0" * 6,
                                  headers={"Content-Type": "application/octet-stream"})
    assert status == 422 and "4 bytes" in answer["message"]
    assert node.request("POST", tpath + "/end")[0] == 204
    status, answer = node.request("POST", tpath + "/pcm", raw=b"\0" * 8,
                                  headers={"Content-Type": "application/octet-stream"})
    assert status == 409 and "closed" in answer["message"]
    end = ws.wait_event("track_end", timeout=10, guild_id=guild)
    assert end["reason"] == "finished"
    wait_quiet(voice_server, user)
    audio = active_part(left_channel(voice_server.record(user).pcm()))
    assert len(audio) >= 1.5 * 48000 - 2 * 4800 - 960     # all of it (active_part trims 0.1 s each side)
    assert peak_frequency(audio) == pytest.approx(523.0, abs=2.0)
    assert rms_db(audio) == pytest.approx(-9.03, abs=1.0)
    # A url track is not a PCM track; a PCM track has no start position.
    status, answer = node.request("POST", path + "/tracks", {"pcm": True, "position": 3})
    assert status == 422 and "no position" in answer["message"]
    status, answer = node.request("POST", path + "/tracks", {"pcm": True, "file": "x.wav"})
    assert status == 422 and "exactly one" in answer["message"]
    assert node.request("DELETE", path)[0] == 204
    ws.close()


def opuslib_packets(pcm: bytes, frame_samples: int = 960) -> list[bytes]:
    """Opus packets made by opuslib (not telecom's encoder)."""
    import opuslib

    encoder = opuslib.Encoder(48000, 2, opuslib.APPLICATION_AUDIO)
    step = frame_samples * 4
    return [encoder.encode(pcm[i:i + step], frame_samples) for i in range(0, len(pcm) - step + 1, step)]


def framed(packets: list[bytes]) -> bytes:
    """The /opus body, written here from the documented format (2-byte big-endian length, then the packet)."""
    return b"".join(len(p).to_bytes(2, "big") + p for p in packets)


def test_opus_track_pushed_over_http_goes_out_as_sent(node, voice_server):
    """A track with opus: true, fed length-prefixed 20 ms packets (all or nothing, 429 when full),
    closed with /end: the voice server receives exactly the pushed packets, in order (passthrough, no
    re-encoding), and decodes the tone; bad bodies are refused with the reason and queue nothing."""
    ws, guild, user, path, tpath = pipe_track(node, voice_server, {"opus": True, "buffer_seconds": 0.5})
    octet = {"Content-Type": "application/octet-stream"}
    packets = opuslib_packets(stereo_tone(1.5, 659.0))
    assert len(packets) == 75
    # Refused before anything is queued: bad framing, a zero length, a 10 ms packet among good ones.
    status, answer = node.request("POST", tpath + "/opus", raw=b"\x00\x05abc", headers=octet)
    assert status == 422 and "needs 5 bytes" in answer["message"], answer
    status, answer = node.request("POST", tpath + "/opus", raw=b"\x00\x00", headers=octet)
    assert status == 422 and "length 0" in answer["message"], answer
    short = opuslib_packets(stereo_tone(0.01, 659.0), 480)
    status, answer = node.request("POST", tpath + "/opus", raw=framed(packets[:3] + short), headers=octet)
    assert status == 422, answer
    assert node.request("GET", tpath)[1]["frames_played"] == 0       # nothing of that body was queued
    full = 0
    for i in range(0, len(packets), 10):
        while True:
            status, answer = node.request("POST", tpath + "/opus", raw=framed(packets[i:i + 10]), headers=octet)
            if status != 429:
                break
            full += 1                                  # 25-packet queue: wait for it to play some
            assert "do not fit" in answer["message"]
            time.sleep(0.05)
        assert status == 200, answer
        assert answer["queued"] == len(packets[i:i + 10]) and answer["capacity"] == 25, answer
    assert full > 0
    assert node.request("POST", tpath + "/end")[0] == 204
    status, answer = node.request("POST", tpath + "/opus", raw=framed(packets[:1]), headers=octet)
    assert status == 409 and "closed" in answer["message"]
    end = ws.wait_event("track_end", timeout=10, guild_id=guild)
    assert end["reason"] == "finished"
    wait_quiet(voice_server, user)
    record = voice_server.record(user)
    assert [p.payload for p in record.audio_packets()] == packets
    audio = active_part(left_channel(record.pcm()))
    assert peak_frequency(audio) == pytest.approx(659.0, abs=2.0)
    assert voice_server.violations(user) == []
    # A PCM track takes no Opus, and the other way round.
    status, pcm_track = node.request("POST", path + "/tracks", {"pcm": True})
    status, answer = node.request("POST", f"{path}/tracks/{pcm_track['id']}/opus", raw=framed(packets[:1]),
                                  headers=octet)
    assert status == 409 and "not an Opus track" in answer["message"]
    status, opus_track = node.request("POST", path + "/tracks", {"opus": True})
    status, answer = node.request("POST", f"{path}/tracks/{opus_track['id']}/pcm", raw=b"\0" * 8, headers=octet)
    assert status == 409 and "not a PCM track" in answer["message"]
    status, answer = node.request("POST", path + "/tracks", {"opus": True, "pcm": True})
    assert status == 422 and "exactly one" in answer["message"]
    assert node.request("DELETE", path)[0] == 204
    ws.close()


def test_file_track_pause_seek_and_media_root(node, voice_server, tmp_root):
    tone_file(node.media, "wav", 4.0, 550.0)
    ws, guild, user, path = ready_player(node, voice_server)
    status, track = node.request("POST", path + "/tracks", {"file": "tone-550-4.wav", "position": 2.5})
    assert status == 201, track
    tid = track["id"]
    time.sleep(0.5)
    status, paused = node.request("PATCH", f"{path}/tracks/{tid}", {"paused": True})
    assert status == 200 and paused["state"] == "paused"
    time.sleep(0.3)
    assert node.request("PATCH", f"{path}/tracks/{tid}", {"paused": False})[1]["state"] == "playing"
    ws.wait_event("track_end", guild_id=guild, track_id=tid)
    wait_quiet(voice_server, user)
    audio = left_channel(voice_server.record(user).pcm())
    heard = np.count_nonzero(np.abs(audio) > 2000) / 48000
    assert 1.0 < heard < 2.0            # started at 2.5 s of a 4 s file: ~1.5 s heard, not 4
    assert peak_frequency(active_part(audio, margin=2400)) == pytest.approx(550.0, abs=3.0)
    # outside the media root, absolute paths, missing files
    for name, status in (("../../etc/passwd", 422), ("/etc/passwd", 422), ("nope.wav", 404)):
        got, body = node.request("POST", path + "/tracks", {"file": name})
        assert got == status, body
        assert body["status"] == status and body["path"] == path + "/tracks" and body["message"]
    ws.close()


def test_recording_through_the_api_decodes(node, voice_server):
    import soundfile

    from telecom import Client, Playable

    ws = WsSession(node)
    guild, channel, user = new_ids()
    speaker = user + 7
    path = f"/v1/sessions/{ws.session_id}/players/{guild}"
    assert node.request("PATCH", path, voice_body(voice_server, guild, channel, user))[0] == 200
    ws.wait_event("ready", guild_id=guild)
    status, rec = node.request("POST", path + "/recordings", {"user_id": str(speaker), "format": "wav"})
    assert status == 201, rec
    creds = voice_server.create_session(guild, channel, speaker)
    talker = Client(speaker, guild, creds.session_id, channel_id=channel)
    talker.set_server_info(voice_server.url, creds.token)
    talker.wait_ready(10)
    ws.wait_event("user_join", guild_id=guild, user_id=speaker)
    pipe = Playable.from_pcm_pipe()
    pipe.send(stereo_tone(2.0, 523.0))
    pipe.close()
    talker.play(pipe)
    pipe.done.result(6)
    ws.wait_event("speaking_stop", guild_id=guild, user_id=speaker)
    status, stopped = node.request("DELETE", f"{path}/recordings/{rec['id']}")
    assert status == 200 and stopped["stopped"] and stopped["frames"] > 0
    status, listing = node.request("GET", "/v1/recordings")
    assert rec["file"] in [f["file"] for f in listing]
    status, data = node.request("GET", f"/v1/recordings/{rec['file']}")
    assert status == 200
    samples, rate = soundfile.read(io.BytesIO(data), dtype="int16")
    assert rate == 48000
    audio = active_part(samples[:, 0].astype(np.float64))
    assert len(audio) > 48000
    assert peak_frequency(audio) == pytest.approx(523.0, abs=2.0)
    assert rms_db(audio) == pytest.approx(-9.03, abs=1.5)
    assert node.request("GET", "/v1/recordings/..%2Fnode.log")[0] in (400, 404)
    talker.close()
    ws.close()


def test_auth_errors_and_validation(node):
    for path in ("/v1/info", "/v1/stats", "/metrics", "/v1/recordings"):
        status, body = node.request("GET", path, auth=None)
        assert status == 401 and body["status"] == 401 and body["path"] == path
        assert node.request("GET", path, auth="wrong")[0] == 401
    assert node.request("GET", "/openapi.json", auth=None)[0] == 200
    ws = WsSession(node)
    base = f"/v1/sessions/{ws.session_id}/players"
    assert node.request("GET", "/v1/sessions/nope/players")[0] == 404
    assert node.request("GET", f"{base}/abc")[0] == 400
    assert node.request("PATCH", f"{base}/123", raw=b"{not json")[0] == 400
    assert node.request("PATCH", f"{base}/123", raw=b"[1]")[0] == 400
    assert node.request("PATCH", f"{base}/123", {"volume": 50})[0] == 409     # no voice yet
    status, body = node.request("PATCH", f"{base}/123", {"volume": 500})
    assert status == 422 and "volume" in body["message"]
    status, body = node.request("PATCH", f"{base}/123", {"voice": {"session_id": "s", "token": "t",
                                                                      "endpoint": "ftp://h/", "user_id": "1"}})
    assert status == 422 and "endpoint" in body["message"]
    status, body = node.request("PATCH", f"{base}/123", raw=b'{"a":"' + b"x" * 70000 + b'"}')
    assert status == 413
    assert node.request("PATCH", f"/v1/sessions/{ws.session_id}", {"timeout": -1})[0] == 422
    status, body = node.request("PATCH", f"/v1/sessions/{ws.session_id}", {"resuming": True, "timeout": 5})
    assert status == 200 and body == {"resuming": True, "timeout": 5}
    ws.close()


def test_url_policy_refuses_private_addresses(strict_node, media, voice_server):
    ws = WsSession(strict_node)
    guild, channel, user = new_ids()
    path = f"/v1/sessions/{ws.session_id}/players/{guild}"
    assert strict_node.request("PATCH", path, voice_body(voice_server, guild, channel, user))[0] == 200
    for url in (media.url("/f/tone.ogg"), f"http://localhost:{media.port}/f/tone.ogg",
                "http://169.254.169.254/latest/meta-data", "http://[::1]/x", "http://10.1.2.3/a.mp3",
                "file:///etc/passwd"):
        status, body = strict_node.request("POST", path + "/tracks", {"url": url})
        assert status == 422, (url, body)
        assert body["error"] in ("URL Refused", "Unprocessable Entity")
    # a hostname that resolves to loopback is refused by address, not by name
    status, body = strict_node.request("POST", path + "/tracks", {"url": f"http://localhost:{media.port}/f/x"})
    assert "127.0.0.1" in body["message"] or "::1" in body["message"]
    ws.close()


class Redirector:
    """A loopback server whose every answer is a 302 to ``target``."""

    def __init__(self, target: str) -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/song.ogg"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_redirect_to_a_private_address_is_refused(node, voice_server):
    """The node allows 127.0.0.1/32 only; an allowed host redirecting to 127.0.0.2 (another private
    address) is refused at the hop: a track_error event, and the target never sees a request."""
    with MediaServer({"a.ogg": b"x" * 100}) as target:
        hop = Redirector(f"http://127.0.0.2:{target.port}/f/a.ogg")
        try:
            ws, guild, user, path = ready_player(node, voice_server)
            status, track = node.request("POST", path + "/tracks", {"url": hop.url})
            assert status == 201     # the first hop is allowed; the redirect is checked when fetched
            err = ws.wait_event("track_error", track_id=track["id"])
            assert "127.0.0.2" in err["cause"] and "redirect" in err["cause"]
            end = ws.wait_event("track_end", track_id=track["id"])
            assert end["reason"] == "error"
            assert target.requests == []
            # directly refused: the private target itself
            for url in (f"http://127.0.0.2:{target.port}/f/a.ogg",):
                status, body = node.request("POST", path + "/tracks", {"url": url})
                assert status == 422 and "private" in body["message"], body
            ws.close()
        finally:
            hop.close()


def test_policy_checks_the_connected_peer():
    """connect_check sees the address actually reached (a DNS answer that changed after the check)."""
    from telecom.server.security import UrlPolicy, UrlRefused
    from telecom.sources.http import HttpFile

    with MediaServer({"a.ogg": b"x" * 100}) as server:
        public = UrlPolicy(resolver=lambda host, port: ["93.184.216.34"])
        url = server.url("/f/a.ogg").replace("127.0.0.1", "localhost")
        assert public.check_url(url) == ["93.184.216.34"]       # the pre-check was fooled...
        f = HttpFile(url, connect_check=public.connect_check)
        with pytest.raises(UrlRefused, match="127.0.0.1|::1"):
            f.open()                                            # ...the connected peer was not
        assert server.requests == []


def test_metrics_and_stats(node):
    status, text = node.request("GET", "/metrics")
    assert status == 200
    text = text.decode()
    lines = [l for l in text.splitlines() if l and not l.startswith("#")]
    names = {l.split("{")[0].split(" ")[0] for l in lines}
    for name in ("telecom_players", "telecom_frames_sent_total", "telecom_frames_late_total",
                 "telecom_frames_deficit_total", "telecom_process_cpu_load", "telecom_http_requests_total"):
        assert name in names
    for line in lines:
        float(line.rsplit(" ", 1)[1])
    assert "# TYPE telecom_frames_sent_total counter" in text
    # Histograms: cumulative buckets ending at +Inf == _count, for send lateness and HTTP durations.
    assert "# TYPE telecom_send_lateness_seconds histogram" in text
    assert "# TYPE telecom_http_request_duration_seconds histogram" in text

    def series(prefix: str, labels: str = "") -> tuple[list[float], float]:
        buckets = [float(l.rsplit(" ", 1)[1]) for l in lines if l.startswith(prefix + "_bucket{" + labels)]
        count = float(next(l for l in lines if l.startswith(prefix + "_count" + ("{" + labels if labels else " ")))
                      .rsplit(" ", 1)[1])
        return buckets, count

    late_buckets, late_count = series("telecom_send_lateness_seconds")
    assert len(late_buckets) == 9 and late_buckets == sorted(late_buckets)
    assert late_buckets[-1] == late_count > 0          # earlier tests played through this node
    assert 'telecom_send_lateness_seconds_bucket{le="0.005"}' in text
    ahead = float(next(l for l in lines if l.startswith("telecom_frames_worked_ahead_total")).split()[1])
    assert ahead > 0                                   # work ahead is on by default
    assert "# TYPE telecom_connections_moved_total counter" in text     # rebalancing, exported
    float(next(l for l in lines if l.startswith("telecom_connections_moved_total ")).split()[1])
    http_buckets, http_count = series("telecom_http_request_duration_seconds", 'method="GET",route="/metrics"')
    assert http_buckets == sorted(http_buckets) and http_buckets[-1] == http_count >= 0
    sent = float(next(l for l in lines if l.startswith("telecom_frames_sent_total")).split()[1])
    status, stats = node.request("GET", "/v1/stats")
    assert stats["frames"]["sent"] >= sent > 0        # earlier tests played through this node
    ws = WsSession(node)
    deadline = time.monotonic() + 5
    while not [m for m in ws.messages if m.get("op") == "stats"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats_msg = next(m for m in ws.messages if m.get("op") == "stats")
    assert {"players", "playing_players", "frames", "cpu", "memory"} <= set(stats_msg)
    ws.close()


def test_session_resume_replays_buffered_events(node, voice_server):
    ws = WsSession(node)
    sid = ws.session_id
    assert node.request("PATCH", f"/v1/sessions/{sid}", {"resuming": True, "timeout": 10})[0] == 200
    guild, channel, user = new_ids()
    path = f"/v1/sessions/{sid}/players/{guild}"
    assert node.request("PATCH", path, voice_body(voice_server, guild, channel, user))[0] == 200
    ws.wait_event("ready", guild_id=guild)
    ws.close()
    time.sleep(0.3)
    # detached: the player lives on, and its events are buffered
    status, track = node.request("POST", path + "/tracks", {"file": "tone-550-4.wav", "position": 3.5})
    assert status == 201
    time.sleep(1.2)
    ws2 = WsSession(node, session_id=sid)
    assert ws2.session_id == sid and ws2.resumed
    ws2.wait_event("track_start", track_id=track["id"])
    ws2.wait_event("track_end", track_id=track["id"])
    ws2.close()
    time.sleep(0.3)
    # without resuming the session and its players go with the websocket
    assert node.request("PATCH", f"/v1/sessions/{sid}", {"resuming": False})[0] == 200
    ws3 = WsSession(node, session_id=sid)
    assert ws3.resumed is False and ws3.session_id != sid
    ws3.close()
    time.sleep(0.3)
    assert node.request("GET", f"/v1/sessions/{sid}")[0] == 404


def test_config_sources_and_password_requirement(tmp_path):
    from telecom.errors import ConfigurationError
    from telecom.server.config import build_config, parse_args

    with pytest.raises(ConfigurationError, match="password"):
        build_config(parse_args([]), env={})
    assert build_config(parse_args(["--no-auth"]), env={}).no_auth
    toml = tmp_path / "node.toml"
    toml.write_text('[server]\nport = 4000\npassword = "from-file"\nallow = ["127.0.0.1/32"]\n')
    cfg = build_config(parse_args(["--config", str(toml)]), env={})
    assert (cfg.port, cfg.password, cfg.allow, cfg.host) == (4000, "from-file", ["127.0.0.1/32"], "127.0.0.1")
    env = {"TELECOM_SERVER_PORT": "4001", "TELECOM_SERVER_DENY": "10.0.0.0/8, evil.example"}
    cfg = build_config(parse_args(["--config", str(toml)]), env=env)
    assert (cfg.port, cfg.deny) == (4001, ["10.0.0.0/8", "evil.example"])           # env over file
    cfg = build_config(parse_args(["--config", str(toml), "--port", "4002"]), env=env)
    assert cfg.port == 4002                                                         # flags over env
    as_json = tmp_path / "node.json"
    as_json.write_text('{"password": "j", "bogus": 1}')
    with pytest.raises(ConfigurationError, match="bogus"):
        build_config(parse_args(["--config", str(as_json)]), env={})
    # engine options: work ahead on unless turned off; SCHED_FIFO priority checked
    assert build_config(parse_args(["--no-auth"]), env={}).work_ahead is True
    assert build_config(parse_args(["--no-auth", "--work-ahead", "off"]), env={}).work_ahead is False
    assert build_config(parse_args(["--no-auth"]), env={"TELECOM_SERVER_WORK_AHEAD": "off"}).work_ahead is False
    assert build_config(parse_args(["--no-auth"]), env={}).rebalance is True
    assert build_config(parse_args(["--no-auth", "--rebalance", "off"]), env={}).rebalance is False
    assert build_config(parse_args(["--no-auth", "--realtime-priority", "10"]), env={}).realtime_priority == 10
    with pytest.raises(ConfigurationError, match="realtime_priority"):
        build_config(parse_args(["--no-auth", "--realtime-priority", "200"]), env={})
    # the node refuses to start without a password, with a clear message
    proc = subprocess.run([sys.executable, "-m", "telecom.server", "--port", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "TELECOM_SERVER_PASSWORD": ""})
    assert proc.returncode == 2 and "needs a password" in proc.stderr


def test_node_applies_its_engine_options(tmp_root, voice_server):
    """``--work-ahead off --rebalance off`` reach the node's engine: /v1/info says so before and after
    the engine starts, a track plays, and no frame is worked ahead."""
    os.makedirs(os.path.join(tmp_root, "no-ahead"), exist_ok=True)
    n = NodeProcess(os.path.join(tmp_root, "no-ahead"), "--work-ahead", "off", "--rebalance", "off",
                    "--media-threads", "2")
    try:
        engine = n.request("GET", "/v1/info")[1]["engine"]
        assert engine == {"running": False, "media_threads": 2, "realtime_priority": 0,
                          "work_ahead": False, "rebalance": False}, engine
        tone_file(n.media, "wav", 1.0, 440.0)
        ws, guild, user, path = ready_player(n, voice_server)
        track = n.request("POST", path + "/tracks", {"file": "tone-440-1.wav"})[1]
        assert ws.wait_event("track_end", track_id=track["id"])["reason"] == "finished"
        text = n.request("GET", "/metrics")[1].decode()
        value = {l.split()[0]: float(l.split()[1]) for l in text.splitlines()
                 if l.startswith(("telecom_frames_worked_ahead_total", "telecom_frames_sent_total"))}
        assert value["telecom_frames_sent_total"] >= 45 and value["telecom_frames_worked_ahead_total"] == 0
        engine = n.request("GET", "/v1/info")[1]["engine"]
        assert engine == {"running": True, "media_threads": 2, "realtime_priority": 0,
                          "work_ahead": False, "rebalance": False}, engine
        ws.close()
    finally:
        n.stop()


def test_player_level_pause_volume_and_stop(node, voice_server):
    tone_file(node.media, "wav", 10.0, 440.0)
    ws, guild, user, path = ready_player(node, voice_server)
    first = node.request("POST", path + "/tracks", {"file": "tone-440-10.wav"})[1]
    second = node.request("POST", path + "/tracks", {"file": "tone-440-10.wav", "volume": 20})[1]
    status, player = node.request("GET", path)
    assert sorted(t["id"] for t in player["tracks"]) == sorted([first["id"], second["id"]])
    assert {t["id"]: t["volume"] for t in player["tracks"]}[second["id"]] == 20
    deadline = time.monotonic() + 10
    while {t["state"] for t in node.request("GET", path)[1]["tracks"]} != {"playing"}:
        assert time.monotonic() < deadline, "tracks did not start"
        time.sleep(0.05)
    status, player = node.request("PATCH", path, {"paused": True})
    assert {t["state"] for t in player["tracks"]} == {"paused"}
    voice_server.wait_for_sync(lambda: voice_server.record(user).speaking_events[-1][1] == 0, 3)
    frames = node.request("GET", path)[1]["stats"]["frames_sent"]
    time.sleep(0.4)
    assert node.request("GET", path)[1]["stats"]["frames_sent"] == frames     # nothing sent while paused
    node.request("PATCH", path, {"paused": False, "volume": 150})
    time.sleep(0.3)
    status, player = node.request("PATCH", path, {"stop": True})
    assert status == 200 and player["tracks"] == [] and player["volume"] == 150
    for tid in (first["id"], second["id"]):
        assert ws.wait_event("track_end", track_id=tid)["reason"] == "stopped"
    ws.close()
