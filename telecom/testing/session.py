"""Voice credentials and the per-member session state of the local voice server.

Owns :class:`VoiceCredentials` (what Discord's main gateway would hand a bot: endpoint, token,
session id and the ids) and :class:`VoiceSession` (one member's voice session: SSRC, transport
key, UDP address, the ``seq`` counter and the resume buffer, validation state). A session outlives
its websocket: a dropped socket leaves it attached to nothing until a Resume (op 7) or the
member-leave grace period runs out.

``seq`` rule: every server message sent on a session *after Hello* carries a sequence number and
is buffered for replay, except the two per-socket replies, op 6 Heartbeat ACK and op 9 Resumed
(replaying an ACK or a Resumed on another socket would be meaningless). JSON and binary frames share
one counter, which starts at 1 and wraps at 2^16 (the binary prefix is 16 bits, and a client keeps
one ``last_seq`` for both). Hello itself is per-socket and carries none.
"""

from __future__ import annotations

import json
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from telecom.testing.records import StreamValidator

if TYPE_CHECKING:  # pragma: no cover
    from telecom.testing.gateway import GatewayConnection
    from telecom.testing.transport import TransportCipher

SEQ_MODULUS = 1 << 16


def binary_frame(seq: int, opcode: int, payload: bytes) -> bytes:
    """A server→client binary frame: ``uint16 BE seq ‖ uint8 opcode ‖ payload`` (spec §1.3)."""
    return struct.pack(">HB", seq & 0xFFFF, opcode) + bytes(payload)


@dataclass(frozen=True)
class VoiceCredentials:
    """What VOICE_STATE_UPDATE + VOICE_SERVER_UPDATE would give a bot (the token is not in repr)."""

    endpoint: str
    token: str = field(repr=False)
    session_id: str
    guild_id: int
    channel_id: int
    user_id: int


class VoiceSession:
    """One issued voice session (one user in one channel). Mutated on the server loop only."""

    def __init__(self, credentials: VoiceCredentials, resume_buffer: int) -> None:
        self.credentials = credentials
        self.user_id = credentials.user_id
        self.guild_id = credentials.guild_id
        self.channel_id = credentials.channel_id
        self.session_id = credentials.session_id
        self._resume_buffer = resume_buffer
        self.reset()

    def reset(self) -> None:
        """A fresh Identify: forget everything about a previous life of these credentials."""
        self.identified = False
        self.ended = False
        self.described = False  # Session Description sent: part of the media session
        self.ssrc: int | None = None
        self.max_dave_protocol_version: int | None = None
        self.dave_protocol_version = 0
        self.mode: str | None = None
        self.secret_key: bytes | None = None
        self.cipher: TransportCipher | None = None
        self.media_session_id: str | None = None
        self.udp_address: tuple[str, int] | None = None
        self.speaking = 0
        self.last_speaking: dict[str, Any] | None = None
        self.connection: GatewayConnection | None = None
        self.leave_handle: Any = None  # asyncio.TimerHandle of the member-leave grace
        self.seq = 0
        self.sent_total = 0
        self.buffer: deque[tuple[int, str | bytes]] = deque(maxlen=self._resume_buffer)
        self.last_seq_ack: int | None = None
        self.validator = StreamValidator()
        self.relay_counter = 0  # transport nonce for packets the SFU sends *to* this member
        self.held: dict[int, tuple[bytes, Any]] = {}  # reorder fault: sender ssrc -> (packet, timer)

    # -- sending (sequenced, buffered) -----------------------------------------------------

    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) % SEQ_MODULUS
        self.sent_total += 1
        return self.seq

    def send(self, op: int, d: Any) -> int:
        """Send (or, while no socket is attached, only buffer) a sequenced JSON message."""
        seq = self._next_seq()
        frame = json.dumps({"op": op, "d": d, "seq": seq}, separators=(",", ":"))
        self.buffer.append((seq, frame))
        if self.connection is not None:
            self.connection.enqueue(frame)
        return seq

    def send_binary(self, opcode: int, payload: bytes) -> int:
        """Send (or buffer) a binary frame carrying the 16-bit sequence prefix."""
        seq = self._next_seq()
        frame = binary_frame(seq, opcode, payload)
        self.buffer.append((seq, frame))
        if self.connection is not None:
            self.connection.enqueue(frame)
        return seq

    def missed_since(self, seq_ack: int | None) -> list[str | bytes] | None:
        """The buffered frames after ``seq_ack``, or None when the buffer no longer covers it."""
        if seq_ack is None or seq_ack < 0:
            # Nothing seen: replay everything, if nothing has fallen out of the buffer yet.
            return [frame for _, frame in self.buffer] if self.sent_total <= len(self.buffer) else None
        missed = (self.seq - seq_ack) % SEQ_MODULUS
        if missed > len(self.buffer) or missed > self.sent_total:
            return None
        if missed == 0:
            return []
        return [frame for _, frame in list(self.buffer)[-missed:]]
