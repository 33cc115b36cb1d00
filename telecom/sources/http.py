"""HTTP(S) input for URL playables: a blocking, seekable file-like object over ``http.client``.

What it owns: one HTTP response at a time for one URL — TLS with certificate verification (certifi's
bundle unless the caller passes a CA file or an ``ssl.SSLContext``), connect and read timeouts, redirects
followed one hop at a time through a check the caller can replace (only http/https, never https -> http),
and reconnection when the connection drops mid-body: a new request with ``Range: bytes=<offset>-`` resumes
at the byte it stopped at (a server that ignores ranges is re-read and the bytes already seen are skipped;
a live stream without a length simply continues at its live edge). ``seek`` is lazy: it only moves the
offset, and the next ``read`` issues the ranged request.

Why not FFmpeg's own HTTP client: it does not verify certificates by default and gives no per-hop say over
redirects (the HTTP node needs that later); and why not aiohttp: PyAV pulls input synchronously from the
decode thread, so a blocking client in that same thread avoids an async-to-sync bridge and a second buffer.

What it must not do: decode anything, or block anything but the decode thread that reads it. Every failure
is an :class:`~telecom.errors.SourceError` subclass naming the cause (HTTP status, TLS, timeout, reset).
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import socket
import ssl as _ssl
import threading
import time
import urllib.parse
from typing import Any, Callable

from telecom.errors import ConfigurationError, SourceError

log = logging.getLogger("telecom.sources")

USER_AGENT = "telecom/0.1 (Discord voice library)"
REDIRECT_CODES = (301, 302, 303, 307, 308)
SKIP_BY_READING = 256 * 1024       # a forward seek this short reads through instead of a new request
# Failures that mean "the connection went away", worth a ranged reconnect.
_DROPS = (ConnectionError, http.client.IncompleteRead, http.client.RemoteDisconnected,
          http.client.BadStatusLine, TimeoutError, socket.timeout, _ssl.SSLEOFError)


class HttpStatusError(SourceError):
    """The server answered with an HTTP error status (``status``: 404, 403, 500, ...)."""

    def __init__(self, message: str, status: int, url: str) -> None:
        super().__init__(message)
        self.status = status
        self.url = url


class TlsError(SourceError):
    """TLS failed: the certificate did not verify, or the handshake broke."""


class StreamDropped(SourceError):
    """The connection dropped and could not be resumed within the reconnect attempts."""


def default_redirect_check(old: str, new: str) -> None:
    """Allow http/https targets only and never downgrade https to http (raises SourceError)."""
    scheme = urllib.parse.urlsplit(new).scheme.lower()
    if scheme not in ("http", "https"):
        raise SourceError(f"redirect to a {scheme or 'relative'} URL refused: {new}")
    if urllib.parse.urlsplit(old).scheme.lower() == "https" and scheme == "http":
        raise SourceError(f"redirect from https to plain http refused: {new}")


_default_context: _ssl.SSLContext | None = None
_default_lock = threading.Lock()


def check_ssl_option(option: Any) -> None:
    """Validate ``ssl=`` at once (the constructor's job); the context itself is built in the worker."""
    if option is None or isinstance(option, _ssl.SSLContext):
        return
    if isinstance(option, (str, os.PathLike)):
        if not os.path.isfile(os.fspath(option)):
            raise ConfigurationError(f"CA file {os.fspath(option)!r} does not exist")
        return
    raise ConfigurationError("ssl must be an ssl.SSLContext, a CA file path or None")


def ssl_context(option: Any = None) -> _ssl.SSLContext:
    """The TLS context for fetching: verification always on (certifi's CAs, else the system's).

    The default context is built once per process and shared (loading the CA bundle takes ~90 ms here,
    too long to repeat per track); a CA file path builds its own context, in the decode thread.
    """
    global _default_context
    check_ssl_option(option)
    if isinstance(option, _ssl.SSLContext):
        return option
    if option is not None:
        return _ssl.create_default_context(cafile=os.fspath(option))
    with _default_lock:
        if _default_context is None:
            try:
                import certifi
                _default_context = _ssl.create_default_context(cafile=certifi.where())
            except ImportError:  # pragma: no cover - certifi is a dependency; the system store verifies
                _default_context = _ssl.create_default_context()
        return _default_context


def check_url(url: Any) -> str:
    """Validate a URL's shape at once (the constructor's job); network errors come later as events."""
    if not isinstance(url, str) or not url:
        raise ConfigurationError(f"url must be a non-empty string, not {url!r}")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise ConfigurationError(f"only http and https URLs can be fetched, not {url!r} "
                                 "(use Playable.from_file for local paths)")
    if not parts.hostname:
        raise ConfigurationError(f"no host in URL {url!r}")
    return url


class HttpFile(io.RawIOBase):
    """A read-only file over an HTTP(S) URL, with lazy ranged seeks and reconnects.

    ``connect_timeout`` bounds the TCP+TLS set-up, ``read_timeout`` each wait for data; ``reconnects`` is
    how many times in a row a dropped body is resumed before :class:`StreamDropped` is raised (the count
    resets once data flows again).
    """

    def __init__(self, url: str, *, ssl: Any = None, connect_timeout: float = 10.0,
                 read_timeout: float = 15.0, reconnects: int = 3, max_redirects: int = 5,
                 headers: dict[str, str] | None = None,
                 redirect_check: Callable[[str, str], None] = default_redirect_check,
                 connect_check: Callable[[str, Any], None] | None = None) -> None:
        super().__init__()
        self.url = check_url(url)
        self.final_url = url
        self._ssl_option = ssl
        self._ctx: _ssl.SSLContext | None = None
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.reconnects = reconnects
        self.max_redirects = max_redirects
        self._headers = dict(headers or {})
        self._redirect_check = redirect_check
        # connect_check(url, peer_address): called on every hop once TCP is connected and before any
        # byte is sent, with the address actually connected to (the HTTP node's SSRF policy; raises).
        self._connect_check = connect_check
        self._conn: http.client.HTTPConnection | None = None
        self._resp: http.client.HTTPResponse | None = None
        self._pos = 0                      # the caller's position
        self._resp_pos = 0                 # where the open response's next byte is
        self.length: int | None = None     # total bytes, when the server says
        self.ranges = False                # the server honours byte ranges
        self.reconnect_count = 0           # reconnects done (for stats and tests)
        self._opened = False
        self._aborted = False

    # -- requests ------------------------------------------------------------------------------------
    def open(self) -> None:
        """First request (raises the HTTP/TLS/connection error at once)."""
        self._request(0)
        self._opened = True

    def _request(self, offset: int) -> None:
        self._drop_response()
        url = self.final_url
        for _hop in range(self.max_redirects + 1):
            parts = urllib.parse.urlsplit(url)
            host, port = parts.hostname, parts.port
            path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            if parts.scheme.lower() == "https":
                if self._ctx is None:
                    self._ctx = ssl_context(self._ssl_option)
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    host, port, timeout=self.connect_timeout, context=self._ctx)
            else:
                conn = http.client.HTTPConnection(host, port, timeout=self.connect_timeout)
            headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **self._headers}
            if offset and self.length is not None:
                # (A live stream has no length: it is resumed at its live edge, not at a byte offset.)
                headers["Range"] = f"bytes={offset}-"
            try:
                conn.connect()
                if self._connect_check is not None:
                    self._connect_check(url, conn.sock.getpeername())
                conn.sock.settimeout(self.read_timeout)
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
            except _ssl.SSLCertVerificationError as exc:
                conn.close()
                raise TlsError(f"certificate verification failed for {host}: {exc.verify_message}") from exc
            except _ssl.SSLError as exc:
                conn.close()
                raise TlsError(f"TLS error with {host}: {exc}") from exc
            except SourceError:
                conn.close()
                raise
            except (TimeoutError, socket.timeout) as exc:
                conn.close()
                raise SourceError(f"timed out connecting to {host}:{port or parts.scheme}") from exc
            except OSError as exc:
                conn.close()
                raise SourceError(f"cannot connect to {host}: {exc}") from exc
            if resp.status in REDIRECT_CODES:
                location = resp.getheader("Location")
                resp.close()
                conn.close()
                if not location:
                    raise HttpStatusError(f"HTTP {resp.status} without a Location", resp.status, url)
                target = urllib.parse.urljoin(url, location)
                self._redirect_check(url, target)
                log.debug("redirect %s -> %s", url, target)
                url = target
                continue
            break
        else:
            raise SourceError(f"more than {self.max_redirects} redirects from {self.url}")
        self.final_url = url
        if resp.status >= 400:
            resp.close()
            conn.close()
            raise HttpStatusError(f"HTTP {resp.status} {resp.reason} for {url}", resp.status, url)
        skip = 0
        if offset and resp.status == 206:
            self.ranges = True
        elif offset and resp.status == 200:
            # The server ignored the range: it sends the whole body again (or a live stream's edge).
            skip = offset if self.length is not None else 0
        elif resp.status not in (200, 206):
            resp.close()
            conn.close()
            raise HttpStatusError(f"unexpected HTTP {resp.status} for {url}", resp.status, url)
        if not offset:
            length = resp.getheader("Content-Length")
            self.length = int(length) if length and length.isdigit() else None
            self.ranges = (resp.getheader("Accept-Ranges") or "").lower() == "bytes"
        self._conn, self._resp = conn, resp
        self._resp_pos = offset
        while skip:
            chunk = resp.read(min(skip, 65536))
            if not chunk:
                raise StreamDropped(f"{url} ended while skipping to byte {offset}")
            skip -= len(chunk)

    def _drop_response(self) -> None:
        if self._resp is not None:
            self._resp.close()
        if self._conn is not None:
            self._conn.close()
        self._resp = self._conn = None

    # -- file interface (what PyAV calls) ----------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.ranges and self.length is not None

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._pos + offset
        elif whence == io.SEEK_END and self.length is not None:
            target = self.length + offset
        else:
            raise OSError("cannot seek from the end of a stream of unknown length")
        if target < 0:
            raise OSError(f"negative seek position {target}")
        # Lazy: only read() acts on it, so FFmpeg's size probe (seek to the end and back) costs nothing.
        self._pos = target
        return self._pos

    def read(self, size: int = -1) -> bytes:
        if self.closed:
            raise ValueError("read from a closed HttpFile")
        if self._aborted:
            raise StreamDropped(f"reading {self.final_url} was aborted")
        if size is None or size < 0:
            size = 1 << 20
        if self.length is not None and self._pos >= self.length:
            return b""
        attempts = 0
        while True:
            try:
                if self._resp is not None and self._resp_pos != self._pos:
                    ahead = self._pos - self._resp_pos
                    if 0 < ahead <= SKIP_BY_READING:
                        self._discard(ahead)     # cheaper than a new request
                    else:
                        self._drop_response()
                if self._resp is None:
                    self._request(self._pos)
                data = self._resp.read(size)  # type: ignore[union-attr]
                if not data and self.length is not None and self._pos < self.length:
                    raise http.client.IncompleteRead(b"", self.length - self._pos)
            except _DROPS as exc:
                attempts += 1
                self._drop_response()
                if self._aborted:
                    raise StreamDropped(f"reading {self.final_url} was aborted") from exc
                if attempts > self.reconnects:
                    raise StreamDropped(
                        f"connection to {self.final_url} dropped at byte {self._pos}"
                        f"{'' if self.length is None else f' of {self.length}'} and could not be resumed "
                        f"after {self.reconnects} attempts: {exc!r}") from exc
                log.info("stream dropped at byte %d (%r); reconnecting (attempt %d)",
                         self._pos, exc, attempts)
                self.reconnect_count += 1
                time.sleep(min(0.1 * 2 ** (attempts - 1), 2.0))
                continue
            except SourceError as exc:
                if attempts and not isinstance(exc, HttpStatusError):
                    # A refused reconnect counts as a failed attempt, not a different error.
                    attempts += 1
                    if attempts <= self.reconnects:
                        time.sleep(min(0.1 * 2 ** (attempts - 1), 2.0))
                        continue
                    raise StreamDropped(f"could not reconnect to {self.final_url}: {exc}") from exc
                raise
            self._pos += len(data)
            self._resp_pos = self._pos
            return data

    def _discard(self, nbytes: int) -> None:
        while nbytes:
            chunk = self._resp.read(min(nbytes, 65536))  # type: ignore[union-attr]
            if not chunk:
                raise http.client.IncompleteRead(b"", nbytes)
            nbytes -= len(chunk)
            self._resp_pos += len(chunk)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def abort(self) -> None:
        """From another thread: make a ``read`` blocked in ``recv`` return now (the track was stopped)."""
        self._aborted = True
        conn = self._conn
        sock = getattr(conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._drop_response()
        super().close()
