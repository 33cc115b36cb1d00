"""telecom: Discord voice for Python bots, with a GIL-free native media engine."""

from telecom.errors import (
    ClientClosed,
    CodecError,
    ConfigurationError,
    ConnectTimeout,
    DecryptError,
    GatewayError,
    PacketError,
    TelecomError,
)

__version__ = "0.1.0"

__all__ = [
    "ClientClosed",
    "CodecError",
    "ConfigurationError",
    "ConnectTimeout",
    "DecryptError",
    "GatewayError",
    "PacketError",
    "TelecomError",
    "__version__",
]
