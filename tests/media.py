"""Test media: tone files written with PyAV, an independent Ogg page reader, and a loopback HTTP(S)
server with the failure modes URL playback must survive or report (drops, 404, truncation, live)."""

from __future__ import annotations

import http.server
import os
import re
import select
import socket
import ssl
import threading
from fractions import Fraction
from typing import Callable

import av
import numpy as np

RATE = 48000

# name -> (extension, container format, codec, encoder options)
FORMATS = {
    "mp3": ("mp3", "mp3", "libmp3lame", {}),
    "vorbis": ("ogg", "ogg", "vorbis", {"strict": "experimental"}),
    "opus": ("opus", "ogg", "libopus", {"frame_duration": "20"}),
    "webm": ("webm", "webm", "libopus", {"frame_duration": "20"}),
    "flac": ("flac", "flac", "flac", {}),
    "wav": ("wav", "wav", "pcm_s16le", {}),
    "m4a": ("m4a", "ipod", "aac", {}),
}


def tone_samples(seconds: float, freq: float, dbfs: float = -6.0, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (10 ** (dbfs / 20) * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_audio(path: str, kind: str, mono: np.ndarray, *, rate: int = RATE, channels: int = 2,
                bitrate: int = 128000, options: dict | None = None) -> str:
    """Encode float samples (one channel, copied to ``channels``) into ``path`` as ``kind``."""
    _ext, fmt, codec, defaults = FORMATS[kind]
    options = {**defaults, **(options or {})}
    with av.open(path, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, options=dict(options))
        stream.layout = "stereo" if channels == 2 else "mono"
        if codec not in ("flac", "pcm_s16le"):
            stream.bit_rate = bitrate
        ctx = stream.codec_context
        sample_fmt = ctx.format.name
        frame_size = ctx.frame_size or 1024
        data = np.tile(mono, (channels, 1))
        pts = 0
        for start in range(0, data.shape[1], frame_size):
            block = np.ascontiguousarray(data[:, start : start + frame_size])
            frame = _frame(block, sample_fmt, stream.layout.name)
            frame.sample_rate = rate
            frame.pts = pts
            frame.time_base = Fraction(1, rate)
            pts += block.shape[1]
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def _frame(block: np.ndarray, sample_fmt: str, layout: str) -> av.AudioFrame:
    planar = sample_fmt.endswith("p")
    base = sample_fmt.rstrip("p")
    if base == "s16":
        values = np.round(block * 32767).astype(np.int16)
    elif base == "s32":
        values = np.round(block * 2147483647).astype(np.int32)
    else:
        values = block.astype(np.float32)
    if not planar:
        values = values.T.reshape(1, -1)
    return av.AudioFrame.from_ndarray(values, format=sample_fmt, layout=layout)


def tone_file(directory: str, kind: str, seconds: float, freq: float, dbfs: float = -6.0,
              **kwargs) -> str:
    path = os.path.join(directory, f"tone-{freq:g}-{seconds:g}.{FORMATS[kind][0]}")
    return write_audio(path, kind, tone_samples(seconds, freq, dbfs), **kwargs)


# -- an Ogg reader that shares nothing with FFmpeg (RFC 3533 pages, RFC 7845 packets) -------------------
def ogg_packets(data: bytes) -> list[bytes]:
    """Every packet of the first logical stream, headers included, reassembled from lacing values."""
    packets: list[bytes] = []
    partial = b""
    pos = 0
    serial = None
    while pos < len(data):
        if data[pos : pos + 4] != b"OggS":
            raise ValueError(f"no Ogg capture pattern at {pos}")
        page_serial = int.from_bytes(data[pos + 14 : pos + 18], "little")
        nsegs = data[pos + 26]
        lacing = data[pos + 27 : pos + 27 + nsegs]
        body = pos + 27 + nsegs
        if serial is None:
            serial = page_serial
        offset = body
        for value in lacing:
            if page_serial == serial:
                partial += data[offset : offset + value]
                if value < 255:
                    packets.append(partial)
                    partial = b""
            offset += value
        pos = offset
    return packets


def _ogg_crc(data: bytes) -> int:
    """RFC 3533's CRC-32: polynomial 0x04C11DB7, MSB first, initial value 0, no final XOR."""
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if crc & 0x80000000 else (crc << 1) & 0xFFFFFFFF
    return crc


def write_ogg_opus(path: str, packets: list[bytes], samples: list[int], *, channels: int = 2,
                   pre_skip: int = 312) -> str:
    """An Ogg Opus file (RFC 7845) holding exactly ``packets``, one per page (``samples``: each packet's
    duration at 48 kHz, for the granule positions). Written here, so a test can put any packet sequence
    in a file, such as frame sizes that change mid-stream, which FFmpeg's muxer would not produce."""
    serial = 0x7E1EC0
    pages = []

    def page(body: bytes, seq: int, granule: int, flags: int) -> bytes:
        lacing = bytes([255] * (len(body) // 255) + [len(body) % 255])
        header = (b"OggS" + bytes([0, flags]) + granule.to_bytes(8, "little", signed=True)
                  + serial.to_bytes(4, "little") + seq.to_bytes(4, "little") + bytes(4)
                  + bytes([len(lacing)]) + lacing)
        raw = header + body
        return raw[:22] + _ogg_crc(raw).to_bytes(4, "little") + raw[26:]

    head = b"OpusHead" + bytes([1, channels]) + pre_skip.to_bytes(2, "little") + (48000).to_bytes(4, "little") \
        + bytes(2) + bytes([0])
    tags = b"OpusTags" + (7).to_bytes(4, "little") + b"telecom" + bytes(4)
    pages.append(page(head, 0, 0, 0x02))
    pages.append(page(tags, 1, 0, 0x00))
    granule = 0
    for i, (packet, n) in enumerate(zip(packets, samples, strict=True)):
        granule += n
        pages.append(page(packet, 2 + i, granule, 0x04 if i == len(packets) - 1 else 0x00))
    with open(path, "wb") as fh:
        fh.write(b"".join(pages))
    return path


# -- a loopback HTTP(S) server with failure modes -------------------------------------------------------
class MediaServer:
    """Serves ``files`` (name -> bytes) on 127.0.0.1 with Range support, plus failure routes:

    ``/f/<name>`` normal (Accept-Ranges, 206 for ranges); ``/drop-once/<name>`` cuts responses half-way
    until a client resumes exactly at the cut with a Range request (one drop, seen by the reader that
    reads through the middle; FFmpeg's probing seeks may open and abandon responses before that);
    ``/drop-always/<name>`` cuts every response half-way; ``/stall/<name>`` sends half and then nothing,
    keeping the connection open until the client hangs up;
    ``/live/<name>`` no length, no ranges; ``/redirect/<name>`` 302 to ``/f/<name>``;
    anything else 404. ``requests`` logs (path, Range header).
    """

    def __init__(self, files: dict[str, bytes], ssl_context: ssl.SSLContext | None = None) -> None:
        self.files = files
        self.requests: list[tuple[str, str | None]] = []
        self._dropped: set[str] = set()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server._handle(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # clients hanging up are expected
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if ssl_context is not None else "http"
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="test-media-server",
                                        daemon=True)

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> "MediaServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        rng = h.headers.get("Range")
        with self._lock:
            self.requests.append((h.path, rng))
        sine = re.fullmatch(r"/sine/(\d+)\.wav", h.path)
        if sine:
            self._sine_wav(h, int(sine.group(1)))
            return
        match = re.fullmatch(r"/(f|drop-once|drop-always|live|redirect|stall)/([\w.\-]+)", h.path)
        if not match or match.group(2) not in self.files:
            body = b"not found"
            h.send_response(404)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        route, name = match.groups()
        data = self.files[name]
        if route == "redirect":
            h.send_response(302)
            h.send_header("Location", f"/f/{name}")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if route == "live":
            h.send_response(200)
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            for start in range(0, len(data), 16384):
                chunk = data[start : start + 16384]
                h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            h.wfile.write(b"0\r\n\r\n")
            return
        start = 0
        if rng:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
        if start >= len(data):
            h.send_response(416)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        h.send_response(206 if rng else 200)
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(data) - start))
        if rng:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        cut = len(data)
        with self._lock:
            if route == "drop-once" and start == len(data) // 2 and rng:
                self._dropped.add(name)          # resumed at the cut: the glitch is over
            if route in ("drop-always", "stall") or (route == "drop-once" and name not in self._dropped):
                cut = max(start, len(data) // 2)
        try:
            h.wfile.write(data[start:cut])
            h.wfile.flush()
        except OSError:
            return
        if cut < len(data) and route == "stall":
            # A server that stops sending but keeps the socket, until the client hangs up.
            while not self._closing.wait(0.05):
                readable, _, _ = select.select([h.connection], [], [], 0)
                if readable:
                    try:
                        if not h.connection.recv(1, socket.MSG_PEEK):
                            break
                    except OSError:
                        break
            h.close_connection = True
            return
        if cut < len(data):
            # An abrupt end mid-body: the client sees fewer bytes than Content-Length said.
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


    @staticmethod
    def _sine_wav(h: http.server.BaseHTTPRequestHandler, seconds: int) -> None:
        """A long 440 Hz WAV made on the fly (one second repeated): hours of audio, no disk or memory."""
        second = np.repeat(np.round(16384 * np.sin(2 * np.pi * 440 * np.arange(RATE) / RATE)), 2)
        block = second.astype("<i2").tobytes()
        size = len(block) * seconds
        header = (b"RIFF" + (36 + size).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
                  + (1).to_bytes(2, "little") + (2).to_bytes(2, "little") + RATE.to_bytes(4, "little")
                  + (RATE * 4).to_bytes(4, "little") + (4).to_bytes(2, "little") + (16).to_bytes(2, "little")
                  + b"data" + size.to_bytes(4, "little"))
        h.send_response(200)
        h.send_header("Content-Length", str(len(header) + size))
        h.end_headers()
        try:
            h.wfile.write(header)
            for _ in range(seconds):
                h.wfile.write(block)
        except OSError:
            pass


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def decode_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("telecom-decode-")]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()
