"""A scripted DAVE participant: the spec's client state machine (§3.3) driven directly through davey.

It extends the independent scripted voice client (aiohttp, PyNaCl/cryptography, opuslib) with a
``davey.DaveSession`` and shares no code with telecom's client (``telecom.dave``) or the server
(``telecom.testing``), so it can check both: it decrypts telecom's audio, and telecom decrypts its.
It passes ``expected_user_ids`` (op 11/13 + itself), answers op 31 with a re-init, and keeps plain
Opus until its session is ready (as discord.py does).
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import davey

from voiceclient_script import FRAME, SILENCE, ScriptedVoiceClient

AUDIO = davey.MediaType.audio


@dataclass
class DavePeer(ScriptedVoiceClient):
    """Call :meth:`join` (handshake + DAVE), then :meth:`stream` Opus frames; ``decrypted`` holds what
    it received from others as ``(user_id, timestamp, opus or None)``."""

    def __post_init__(self) -> None:
        self.dave: davey.DaveSession | None = None
        self.external_sender: bytes | None = None  # op 25 may come before the session exists
        self.version = 0
        self.pending: dict[int, int] = {}
        self.users: set[int] = set()
        self.ssrc_users: dict[int, int] = {}
        self.sent_ops: list[tuple[int, Any]] = []
        self.failures: list[str] = []  # process_commit / process_welcome errors (→ op 31)
        self.errors: list[str] = []  # anything else davey refused (a test fails on these)
        self.drop_commits = 0  # fault: this many commits are made but never sent (a lost op 28)
        self.decrypted: list[tuple[int, int, bytes | None]] = []
        self.decrypt_errors: list[str] = []
        self.sent_plain = 0
        self.sent_encrypted = 0
        self._rtp_seen = 0
        self._drain_task: asyncio.Task | None = None

    # -- websocket --------------------------------------------------------------------------------

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                data = json.loads(msg.data)
                if "seq" in data:
                    self.last_seq = data["seq"]
                self.messages.append(data)
                await self._guarded(self._on_json(data["op"], data.get("d")))
            elif msg.type == aiohttp.WSMsgType.BINARY:
                (seq,) = struct.unpack_from(">H", msg.data)
                self.last_seq = seq
                self.messages.append({"op": msg.data[2], "binary": bytes(msg.data[3:]), "seq": seq})
                await self._guarded(self._on_binary(msg.data[2], bytes(msg.data[3:])))
            self._changed.set()
        self.close_code = self.ws.close_code
        self.closed.set()
        self._changed.set()

    async def _guarded(self, step: Any) -> None:
        try:
            await step
        except (ValueError, KeyError, TypeError) as exc:
            self.errors.append(repr(exc))

    async def send_binary(self, op: int, payload: bytes) -> None:
        self.sent_ops.append((op, payload))
        await self.ws.send_bytes(bytes((op,)) + payload)

    async def send(self, op: int, d: Any) -> None:
        self.sent_ops.append((op, d))
        await super().send(op, d)

    async def join(self, mode: str = "aead_aes256_gcm_rtpsize") -> dict[str, Any]:
        desc = await self.handshake(mode)
        self.version = desc["dave_protocol_version"]
        if self.version > 0:
            await self._init_session()
        await self.speaking(1)
        self._drain_task = asyncio.ensure_future(self._drain())
        self._beat_task = asyncio.ensure_future(self._beat())
        return desc

    async def _beat(self) -> None:
        t = 0
        while not self.ws.closed:
            t += 1
            await super().send(3, {"t": t, "seq_ack": self.last_seq})
            await asyncio.sleep(0.5)

    async def _init_session(self) -> None:
        if self.dave is None:
            self.dave = davey.DaveSession(self.version, self.user_id, self.channel_id)
            if self.external_sender is not None:
                self.dave.set_external_sender(self.external_sender)
        else:
            self.dave.reinit(self.version, self.user_id, self.channel_id)
        await self.send_binary(26, self.dave.get_serialized_key_package())

    def _expected(self) -> list[int]:
        return sorted(self.users | {self.user_id})

    async def _on_json(self, op: int, d: Any) -> None:
        if op == 11:
            self.users.update(int(u) for u in d["user_ids"])
        elif op == 13:
            self.users.discard(int(d["user_id"]))
        elif op == 5:
            self.ssrc_users[int(d["ssrc"])] = int(d["user_id"])
        elif op == 21:
            tid, version = d["transition_id"], d["protocol_version"]
            self.pending[tid] = version
            if tid == 0:
                self._execute(0)
            else:
                if version == 0 and self.dave is not None:
                    self.dave.set_passthrough_mode(True, None)
                await self.send(23, {"transition_id": tid})
        elif op == 22:
            self._execute(d["transition_id"])
        elif op == 24:
            if d["epoch"] == 1:
                self.version = d["protocol_version"]
                await self._init_session()

    def _execute(self, tid: int) -> None:
        version = self.pending.pop(tid, None)
        if version is None:
            return
        if version == 0 and self.dave is not None:
            self.dave.set_passthrough_mode(True, None)
        elif self.version == 0 and version > 0 and self.dave is not None:
            self.dave.set_passthrough_mode(True, 10)
        self.version = version

    async def _on_binary(self, op: int, payload: bytes) -> None:
        if op == 25:
            self.external_sender = payload
        dave = self.dave
        if dave is None:
            return
        if op == 25:
            dave.set_external_sender(payload)
        elif op == 27:
            ops = davey.ProposalsOperationType
            kind = ops.append if payload[0] == 0 else ops.revoke
            cw = dave.process_proposals(kind, payload[1:], expected_user_ids=self._expected())
            if cw is not None:
                if self.drop_commits > 0:
                    self.drop_commits -= 1
                    return
                await self.send_binary(28, cw.commit + (cw.welcome or b""))
        elif op in (29, 30):
            (tid,) = struct.unpack_from(">H", payload)
            try:
                if op == 29:
                    dave.process_commit(payload[2:])
                else:
                    dave.process_welcome(payload[2:])
            except ValueError as exc:
                self.failures.append(f"op {op}: {exc}")
                await self.send(31, {"transition_id": tid})
                await self._init_session()
                return
            if tid != 0:
                self.pending[tid] = self.version or 1
                await self.send(23, {"transition_id": tid})

    # -- media ---------------------------------------------------------------------------------------

    def protect(self, opus: bytes) -> bytes:
        dave = self.dave
        if dave is not None and self.version > 0 and dave.ready and opus != SILENCE:
            self.sent_encrypted += 1
            return dave.encrypt_opus(opus)
        self.sent_plain += 1
        return opus

    async def stream(self, frames: list[bytes], silence_after: int = 5, start_timestamp: int = 5000) -> None:
        """Send frames on a 20 ms grid, DAVE-encrypting each at send time (the epoch may change)."""
        payloads = list(frames) + [SILENCE] * silence_after
        start = time.monotonic()
        for i, opus in enumerate(payloads):
            delay = start + 0.020 * i - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self._stream_index = getattr(self, "_stream_index", 0) + 1
            n = self._stream_index
            self.send_raw(self.seal(self.protect(opus), 2000 + n, start_timestamp + FRAME * n, 100 + n))

    async def _drain(self) -> None:
        while True:
            await asyncio.sleep(0.01)
            if self.udp is None:
                continue
            packets = self.udp.rtp[self._rtp_seen:]
            self._rtp_seen += len(packets)
            for _, data in packets:
                opened = self.open(data)
                user = self.ssrc_users.get(opened.ssrc)
                payload = opened.payload
                if payload == SILENCE or user is None:
                    continue
                try:
                    if self.dave is None or (self.version == 0 and not payload.endswith(b"\xfa\xfa")):
                        plain = payload
                    else:
                        plain = self.dave.decrypt(user, AUDIO, payload)
                except ValueError as exc:
                    self.decrypt_errors.append(str(exc))
                    plain = None
                self.decrypted.append((user, opened.timestamp, plain))

    def audio_from(self, user_id: int) -> list[bytes | None]:
        return [p for u, _, p in self.decrypted if u == user_id]

    async def close(self, code: int = 1000) -> None:
        for task in (self._drain_task, getattr(self, "_beat_task", None)):
            if task is not None:
                task.cancel()
        await super().close(code)
