"""The error tree: everything telecom raises derives from :class:`TelecomError`.

Each class also inherits the builtin a caller would catch anyway (``ValueError``,
``ConnectionError``, ``TimeoutError``), so ``except ValueError`` keeps working.
Close codes and causes are attached as attributes, never only in the message.
"""

from __future__ import annotations


class TelecomError(Exception):
    """Root of every error telecom raises."""


class PacketError(TelecomError, ValueError):
    """A packet could not be parsed: short, wrong version, bad lengths."""


class DecryptError(PacketError):
    """A packet failed transport (AEAD) authentication or decryption."""


class CodecError(TelecomError, ValueError):
    """libopus refused the input or reported an internal error (``code`` is libopus' error)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class GatewayError(TelecomError, ConnectionError):
    """The voice gateway closed the connection or broke the protocol.

    ``code`` is the websocket close code when there was one (e.g. 4004, 4017).
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class ConnectTimeout(TelecomError, TimeoutError):
    """A ``wait_*`` call or a handshake step ran out of time."""


class ClientClosed(TelecomError, ConnectionError):
    """The client was closed; no more calls can be made on it."""


class ConfigurationError(TelecomError, ValueError):
    """An argument or option is invalid (a bad endpoint, volume out of range, no channel id for DAVE)."""


class BufferFull(TelecomError, BufferError):
    """A playable's buffer has no room for the data; nothing of it was taken."""


class SourceError(TelecomError, OSError):
    """A URL or file playable could not be fetched, demuxed or decoded (HTTP status, TLS, dropped
    stream, unsupported or corrupt data). Arrives as the ``error`` of a ``track_error`` event and on
    the playable's ``done`` future; subclasses carry details (``status`` for HTTP errors)."""


class SourceNotFound(SourceError, FileNotFoundError):
    """``Playable.from_file`` was given a path that does not exist (raised at once)."""
