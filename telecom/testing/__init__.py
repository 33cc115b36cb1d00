"""telecom.testing: the local voice server, a faithful stand-in for Discord's voice servers.

Use it to test voice code offline (``telecom emulate`` runs it from the command line)::

    from telecom.testing import LocalVoiceServer

    async with LocalVoiceServer(dave=False) as server:
        creds = server.create_session(guild_id=1, channel_id=2, user_id=3)
        # connect with creds.endpoint / creds.token / creds.session_id, play something, then:
        record = server.record(3)          # what arrived, decrypted; record.pcm() decodes it
        assert not server.violations()     # protocol rules the client broke, if any

It checks what clients send with its own code (PyNaCl, ``cryptography``, opuslib) and never with
telecom's wire code; it needs the ``telecom[testing]`` extra.
"""

from telecom.testing.faults import DaveHooks, Faults
from telecom.testing.gateway import CloseCode, Op
from telecom.testing.records import ReceivedPacket, StreamRecord, Violation
from telecom.testing.server import LocalVoiceServer
from telecom.testing.session import VoiceCredentials, VoiceSession, binary_frame

__all__ = [
    "CloseCode",
    "DaveHooks",
    "Faults",
    "LocalVoiceServer",
    "Op",
    "ReceivedPacket",
    "StreamRecord",
    "Violation",
    "VoiceCredentials",
    "VoiceSession",
    "binary_frame",
]
