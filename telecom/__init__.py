"""telecom: Discord voice for Python bots, with a GIL-free native media engine.

>>> from telecom import Client, Playable
>>> client = Client(user_id, guild_id, session_id, channel_id=channel_id)   # doctest: +SKIP
>>> client.set_server_info(endpoint, token); client.wait_ready()             # doctest: +SKIP
>>> pipe = Playable.from_pcm_pipe(); client.play(pipe); pipe.send(pcm)       # doctest: +SKIP
"""

from telecom.client import Client, Event, User
from telecom.errors import (
    BufferFull,
    ClientClosed,
    CodecError,
    ConfigurationError,
    ConnectTimeout,
    DecryptError,
    GatewayError,
    PacketError,
    TelecomError,
)
from telecom.output import AudioFrame, Muxer, Output
from telecom.playable import OpusPipe, PcmPipe, Playable

__version__ = "0.1.0"

__all__ = [
    "AudioFrame",
    "BufferFull",
    "Client",
    "ClientClosed",
    "CodecError",
    "ConfigurationError",
    "ConnectTimeout",
    "DecryptError",
    "Event",
    "GatewayError",
    "Muxer",
    "OpusPipe",
    "Output",
    "PacketError",
    "PcmPipe",
    "Playable",
    "TelecomError",
    "User",
    "__version__",
]
