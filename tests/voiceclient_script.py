"""A scripted voice client for testing the local voice server, written from the spec alone.

It uses plain aiohttp, PyNaCl, ``cryptography`` and opuslib, and deliberately shares no code with
either telecom's client or ``telecom.testing`` (its own RTP building, rtpsize sealing and opening),
so a server bug and a client bug cannot cancel out. Every step is explicit so tests can do it
wrong on purpose (skip Speaking, jump a sequence, reuse a nonce, ...).
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp
import numpy as np
import opuslib
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)

AES = "aead_aes256_gcm_rtpsize"
XCHACHA = "aead_xchacha20_poly1305_rtpsize"
SILENCE = b"\xf8\xff\xfe"
RATE = 48000
FRAME = 960
OMIT = object()


def tone_frames(freq: float, seconds: float, amplitude: float = 0.3) -> tuple[list[bytes], np.ndarray]:
    """Opus-encode a stereo sine in 20 ms frames; return (packets, the pcm that went in)."""
    n = int(round(seconds * RATE / FRAME)) * FRAME
    t = np.arange(n) / RATE
    mono = (amplitude * 32767 * np.sin(2 * math.pi * freq * t)).astype(np.int16)
    stereo = np.repeat(mono[:, None], 2, axis=1)
    encoder = opuslib.Encoder(RATE, 2, opuslib.APPLICATION_AUDIO)
    frames = [encoder.encode(stereo[i : i + FRAME].tobytes(), FRAME) for i in range(0, n, FRAME)]
    return frames, stereo


def analyse(pcm: bytes, skip_seconds: float = 0.1) -> tuple[float, float]:
    """(dominant frequency in Hz, RMS of the left channel) of s16le stereo, edges skipped."""
    samples = np.frombuffer(pcm, dtype="<i2").reshape(-1, 2)[:, 0].astype(np.float64)
    skip = int(skip_seconds * RATE)
    body = samples[skip : len(samples) - skip]
    window = np.hanning(len(body))
    spectrum = np.abs(np.fft.rfft(body * window, n=8 * len(body)))
    k = int(np.argmax(spectrum[1:])) + 1
    # parabolic interpolation around the peak bin
    a, b, c = spectrum[k - 1], spectrum[k], spectrum[k + 1]
    offset = 0.5 * (a - c) / (a - 2 * b + c) if (a - 2 * b + c) else 0.0
    freq = (k + offset) * RATE / (8 * len(body))
    rms = float(np.sqrt(np.mean(body**2)))
    return freq, rms


@dataclass
class OpenedPacket:
    ssrc: int
    sequence: int
    timestamp: int
    marker: bool
    payload_type: int
    extension: bool
    extension_profile: int | None
    extension_body: bytes
    counter: int
    payload: bytes


class _Udp(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.discovery: asyncio.Queue[bytes] = asyncio.Queue()
        self.rtp: list[tuple[float, bytes]] = []

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) == 74 and data[:2] == b"\x00\x02":
            self.discovery.put_nowait(data)
        else:
            self.rtp.append((time.monotonic(), data))


@dataclass
class ScriptedVoiceClient:
    guild_id: int
    channel_id: int
    user_id: int
    session_id: str
    token: str
    url: str
    ssl: Any = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    last_seq: int = -1
    close_code: int | None = None

    @classmethod
    def for_credentials(cls, creds: Any, url: str, ssl: Any = None) -> ScriptedVoiceClient:
        return cls(creds.guild_id, creds.channel_id, creds.user_id, creds.session_id, creds.token, url, ssl)

    # -- websocket ----------------------------------------------------------------------------

    async def connect(self, query: str = "?v=8") -> dict[str, Any]:
        """Open the socket; return Hello (or raise if the server closes instead)."""
        self._http = aiohttp.ClientSession()
        ssl = self.ssl if self.ssl is not None else True
        self.ws = await self._http.ws_connect(self.url + query, ssl=ssl)
        self._changed = asyncio.Event()
        self.closed = asyncio.Event()
        self.close_code = None
        start = len(self.messages)
        self._reader = asyncio.ensure_future(self._read())
        if not hasattr(self, "udp"):  # a reconnect (resume) keeps the UDP socket
            self.udp: _Udp | None = None
            self._udp_transport: asyncio.DatagramTransport | None = None
        return await self.wait_op(8, start=start)

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                data = json.loads(msg.data)
                if "seq" in data:
                    self.last_seq = data["seq"]
                self.messages.append(data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                (seq,) = struct.unpack_from(">H", msg.data)
                self.last_seq = seq
                self.messages.append({"op": msg.data[2], "binary": bytes(msg.data[3:]), "seq": seq})
            self._changed.set()
        self.close_code = self.ws.close_code
        self.closed.set()
        self._changed.set()

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"timed out; messages so far: {self.messages}")
            self._changed.clear()
            try:
                # UDP arrivals do not set the event: poll as well.
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.02))
            except asyncio.TimeoutError:
                pass

    async def wait_op(self, op: int, timeout: float = 5.0, start: int = 0) -> dict[str, Any]:
        def find() -> Any:
            for m in self.messages[start:]:
                if m["op"] == op:
                    return m
            if self.closed.is_set():
                raise ConnectionError(f"closed with {self.close_code} while waiting for op {op}")
            return None

        return await self.wait_for(find, timeout)

    async def wait_closed(self, timeout: float = 5.0) -> int | None:
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.close_code

    async def send(self, op: int, d: Any) -> None:
        await self.ws.send_str(json.dumps({"op": op, "d": d}))

    async def identify(self, max_dave: Any = 1, **overrides: Any) -> None:
        d = {
            "server_id": str(self.guild_id),
            "user_id": str(self.user_id),
            "session_id": self.session_id,
            "token": self.token,
            "max_dave_protocol_version": max_dave,
        }
        if max_dave is OMIT:
            del d["max_dave_protocol_version"]
        d.update(overrides)
        await self.send(0, d)

    async def heartbeat(self, t: int) -> dict[str, Any]:
        start = len(self.messages)
        await self.send(3, {"t": t, "seq_ack": self.last_seq})
        return await self.wait_op(6, start=start)

    # -- UDP ----------------------------------------------------------------------------------

    async def discover(self, ready: dict[str, Any]) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._udp_transport, self.udp = await loop.create_datagram_endpoint(_Udp, local_addr=("127.0.0.1", 0))
        self.server_udp = (ready["ip"], ready["port"])
        request = struct.pack(">HHI", 1, 70, ready["ssrc"]) + bytes(66)
        assert len(request) == 74
        self._udp_transport.sendto(request, self.server_udp)
        response = await asyncio.wait_for(self.udp.discovery.get(), 5)
        _, length, ssrc = struct.unpack_from(">HHI", response)
        assert length == 70 and ssrc == ready["ssrc"]
        ip = response[8:72].split(b"\0", 1)[0].decode()
        (port,) = struct.unpack_from(">H", response, 72)
        return ip, port

    async def handshake(self, mode: str = AES, max_dave: Any = 1) -> dict[str, Any]:
        """Hello → Identify → Ready → IP discovery → Select Protocol → Session Description."""
        await self.connect()
        await self.identify(max_dave=max_dave)
        self.ready = (await self.wait_op(2))["d"]
        self.ssrc = self.ready["ssrc"]
        ip, port = await self.discover(self.ready)
        self.discovered = (ip, port)
        await self.send(1, {"protocol": "udp", "data": {"address": ip, "port": port, "mode": mode}})
        self.description = (await self.wait_op(4))["d"]
        self.mode = self.description["mode"]
        self.key = bytes(self.description["secret_key"])
        return self.description

    async def speaking(self, flags: int, ssrc: int | None = None) -> None:
        await self.send(5, {"speaking": flags, "delay": 0, "ssrc": self.ssrc if ssrc is None else ssrc})

    # -- RTP, sealed per spec §2.4 -------------------------------------------------------------

    def _nonce(self, counter: int) -> bytes:
        return struct.pack(">I", counter) + bytes(8 if self.mode == AES else 20)

    def seal(self, payload: bytes, sequence: int, timestamp: int, counter: int, payload_type: int = 0x78,
             key: bytes | None = None) -> bytes:
        header = struct.pack(">BBHII", 0x80, payload_type, sequence & 0xFFFF, timestamp & 0xFFFFFFFF,
                             self.ssrc)
        key = self.key if key is None else key
        nonce = self._nonce(counter & 0xFFFFFFFF)
        if self.mode == AES:
            sealed = AESGCM(key).encrypt(nonce, payload, header)
        else:
            sealed = crypto_aead_xchacha20poly1305_ietf_encrypt(payload, header, nonce, key)
        return header + sealed + nonce[:4]

    def send_raw(self, packet: bytes) -> None:
        assert self._udp_transport is not None
        self._udp_transport.sendto(packet, self.server_udp)

    async def send_stream(
        self,
        payloads: list[bytes],
        *,
        sequences: list[int] | None = None,
        counters: list[int] | None = None,
        start_timestamp: int = 123456,
        silence_after: int = 5,
    ) -> None:
        """Send payloads then ``silence_after`` silence frames, paced on an absolute 20 ms grid."""
        payloads = list(payloads) + [SILENCE] * silence_after
        n = len(payloads)
        sequences = sequences if sequences is not None else [(1000 + i) & 0xFFFF for i in range(n)]
        counters = counters if counters is not None else list(range(7, 7 + n))
        start = time.monotonic()
        for i, payload in enumerate(payloads):
            delay = start + 0.020 * i - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.send_raw(self.seal(payload, sequences[i], start_timestamp + FRAME * i, counters[i]))

    def open(self, packet: bytes) -> OpenedPacket:
        """Open a relayed packet with the rtpsize rule (extension body is inside the ciphertext)."""
        b0, b1, sequence, timestamp, ssrc = struct.unpack_from(">BBHII", packet)
        cc = b0 & 0x0F
        has_ext = bool(b0 & 0x10)
        aad_len = 12 + 4 * cc + (4 if has_ext else 0)
        profile = words = None
        if has_ext:
            profile, words = struct.unpack_from(">HH", packet, 12 + 4 * cc)
        counter_bytes = packet[-4:]
        nonce = counter_bytes + bytes(8 if self.mode == AES else 20)
        if self.mode == AES:
            plain = AESGCM(self.key).decrypt(nonce, packet[aad_len:-4], packet[:aad_len])
        else:
            plain = crypto_aead_xchacha20poly1305_ietf_decrypt(
                packet[aad_len:-4], packet[:aad_len], nonce, self.key)
        body = b""
        if has_ext:
            body, plain = plain[: 4 * words], plain[4 * words :]
        if b0 & 0x20:
            plain = plain[: -plain[-1]]
        return OpenedPacket(ssrc, sequence, timestamp, bool(b1 & 0x80), b1 & 0x7F, has_ext, profile, body,
                            struct.unpack(">I", counter_bytes)[0], plain)

    def received(self) -> list[OpenedPacket]:
        assert self.udp is not None
        return [self.open(data) for _, data in self.udp.rtp]

    async def close(self, code: int = 1000) -> None:
        if getattr(self, "ws", None) is not None and not self.ws.closed:
            await self.ws.close(code=code)
        if getattr(self, "_reader", None) is not None:
            try:
                await asyncio.wait_for(self._reader, 2)
            except (asyncio.TimeoutError, Exception):
                self._reader.cancel()
        if getattr(self, "_udp_transport", None) is not None:
            self._udp_transport.close()
        if getattr(self, "_http", None) is not None:
            await self._http.close()


def decode_opus(payloads: list[bytes]) -> bytes:
    decoder = opuslib.Decoder(RATE, 2)
    out = bytearray()
    for p in payloads:
        out += bytes(FRAME * 4) if p == SILENCE else decoder.decode(p, 5760)
    return bytes(out)
