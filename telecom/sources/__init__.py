"""URL and file sources: what ``Playable.from_url`` and ``Playable.from_file`` build.

What it owns: argument checking for those constructors (done at once, in the caller's thread) and the
wiring of a :class:`~telecom.sources.track.Track` to its input: an HTTP(S) fetch with verification,
timeouts and reconnects (:mod:`.http`), PyAV decode workers a bounded time ahead (:mod:`.decode`),
Opus passthrough detection (:mod:`.demux`) and PCM format conversion for pipes (:mod:`.convert`).

What it must not do: any I/O in the constructors — network and format errors arrive later as
``track_error`` / ``track_end`` (reason ``error``) events and on the playable's ``done`` future. A missing
local file is the exception: it is the caller's mistake and raises :class:`~telecom.errors.SourceNotFound`
at once.
"""

from __future__ import annotations

import os
from typing import Any

from telecom.errors import ConfigurationError, SourceError, SourceNotFound
from telecom.sources.decode import DecodeError, configure
from telecom.sources.http import HttpStatusError, StreamDropped, TlsError, check_ssl_option, check_url
from telecom.sources.track import Track, file_opener, url_opener


def _check_timeout(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{what} must be seconds, not {value!r}") from None
    if not 0 < number <= 600:
        raise ConfigurationError(f"{what} must be in (0, 600] seconds, not {value!r}")
    return number


def open_url(url: str, *, ahead_seconds: float = 5.0, connect_timeout: float = 10.0,
             read_timeout: float = 15.0, reconnects: int = 3, ssl: Any = None,
             headers: dict[str, str] | None = None, max_redirects: int = 5,
             passthrough: bool = True) -> Track:
    check_url(url)
    if not isinstance(reconnects, int) or reconnects < 0:
        raise ConfigurationError("reconnects must be an int >= 0")
    if not isinstance(max_redirects, int) or max_redirects < 0:
        raise ConfigurationError("max_redirects must be an int >= 0")
    if headers is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise ConfigurationError("headers must map str to str")
    check_ssl_option(ssl)
    options = dict(ssl=ssl, connect_timeout=_check_timeout(connect_timeout, "connect_timeout"),
                   read_timeout=_check_timeout(read_timeout, "read_timeout"), reconnects=reconnects,
                   headers=headers, max_redirects=max_redirects)
    return Track(url, url_opener(url, options), ahead_seconds=ahead_seconds, passthrough=passthrough)


def open_file(path: str | os.PathLike, *, ahead_seconds: float = 5.0, passthrough: bool = True) -> Track:
    try:
        name = os.fspath(path)
    except TypeError:
        raise ConfigurationError(f"path must be a str or os.PathLike, not {type(path).__name__}") from None
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if not os.path.exists(name):
        raise SourceNotFound(f"no such file: {name}")
    if os.path.isdir(name):
        raise ConfigurationError(f"{name} is a directory, not an audio file")
    if not os.access(name, os.R_OK):
        raise SourceError(f"{name} is not readable")
    return Track(name, file_opener(name), ahead_seconds=ahead_seconds, passthrough=passthrough,
                 seekable_hint=True)


__all__ = ["DecodeError", "HttpStatusError", "SourceError", "SourceNotFound", "StreamDropped", "TlsError",
           "Track", "configure", "open_file", "open_url"]
