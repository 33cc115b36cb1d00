"""What the local voice server received from each member, and the checks it runs on it.

Owns :class:`ReceivedPacket`, :class:`StreamRecord` (per user: packets as decrypted, speaking
events, counters, and ``pcm()`` which decodes with opuslib, not telecom's Opus), :class:`Violation`
and :class:`StreamValidator` (spec §2.3, §2.5, §2.6 rules). Validation only records; it never
raises and never drops a packet.

Rules, and their tolerances:

* ``sequence_jump``: the RTP sequence must be the previous one + 1 (mod 2^16).
* ``timestamp_jump``: inside a talk spurt (previous packet was audio) the timestamp advances by
  exactly 960 (20 ms at 48 kHz). After a silence frame the spurt has ended: +960 if the sender
  goes straight on, otherwise the jump must be a multiple of 960 within ±:data:`GAP_TOLERANCE_FRAMES`
  frames (60 ms) of the elapsed arrival time. A sender that stalls inside a spurt for more than
  :data:`GAP_SECONDS` and resumes with +960 kept its timeline; that is counted in ``late_packets``,
  not flagged (and so is a jump that matches the elapsed time, as when it paused without silence;
  and a late +960 right after a silence frame when no Speaking 0 came in between). Arrival times
  are the kernel's (SO_TIMESTAMPNS), so this server's own scheduling delays do not count.
* ``nonce_reused`` / ``nonce_not_incrementing``: the 4-byte transport counter must never repeat
  under one key and should go up by exactly 1 per packet (mod 2^32).
* Packets lost on the way (UDP on a loaded machine drops them too, at the server's socket) are not
  the sender's fault: when the sequence, the nonce and the timestamp all advance by the same number
  of packets k (2 ≤ k ≤ :data:`MAX_LOSS_RUN`), the k − 1 missing ones are counted in ``lost_packets``
  and nothing is flagged.
* ``audio_before_speaking``: a non-silence payload before the member's first op 5 with a non-zero
  mask. The websocket and UDP are not ordered with respect to each other (and the server reads UDP
  first when both are ready), so a Speaking arriving up to :data:`SPEAKING_GRACE_SECONDS` after the
  first audio still counts as sent before it. Recorded once per session.
* ``payload_type``: anything but 0x78 (Opus).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

from telecom.testing.transport import SILENCE_FRAME

FRAME_SAMPLES = 960  # per channel, 20 ms at 48 kHz
FRAME_SECONDS = 0.020
GAP_SECONDS = 0.100
GAP_TOLERANCE_FRAMES = 3
SPEAKING_GRACE_SECONDS = 0.25
#: Largest timestamp gap ``pcm()`` fills with silence (a bigger one is treated as a new timeline).
MAX_FILLED_GAP_SECONDS = 60.0
_SILENCE_20MS = bytes(FRAME_SAMPLES * 2 * 2)

MAX_LOSS_RUN = 50  # packets in a row that may go missing on the way before it counts as a jump

VIOLATION_KINDS = (
    "audio_before_speaking",
    "sequence_jump",
    "timestamp_jump",
    "nonce_reused",
    "nonce_not_incrementing",
    "payload_type",
    "decrypt_failed",
    "malformed_packet",
    "identify_fields",
    "unknown_ssrc",
    "speaking_ssrc",
)


@dataclass(frozen=True)
class ReceivedPacket:
    """One RTP packet as the server opened it. ``payload`` is decrypted, extension body skipped,
    padding stripped (still DAVE-encrypted if the sender used DAVE)."""

    arrival: float  # time.monotonic()
    sequence: int
    timestamp: int
    ssrc: int
    marker: bool
    payload_type: int
    counter: int  # the transport nonce counter
    payload: bytes
    size: int  # bytes on the wire

    @property
    def is_silence(self) -> bool:
        return self.payload == SILENCE_FRAME


@dataclass(frozen=True)
class Violation:
    """Something a member sent that Discord's servers would reject or that breaks receivers."""

    kind: str
    user_id: int | None
    ssrc: int | None
    detail: str
    at: float  # time.monotonic()


@dataclass
class StreamRecord:
    """Everything received on UDP from one user's SSRC (snapshots are copies)."""

    user_id: int
    ssrc: int | None = None
    packets: list[ReceivedPacket] = field(default_factory=list)
    silence_frames: int = 0
    speaking_events: list[tuple[float, int]] = field(default_factory=list)
    rtcp_packets: int = 0
    late_packets: int = 0
    lost_packets: int = 0
    # (index in packets, time.monotonic() when the server had relayed it to the other members): what
    # they can see, which trails ``arrival`` by the server's own processing delay
    relay_times: list[tuple[int, float]] = field(default_factory=list)

    def copy(self) -> StreamRecord:
        return replace(self, packets=list(self.packets), speaking_events=list(self.speaking_events),
                       relay_times=list(self.relay_times))

    def audio_packets(self) -> list[ReceivedPacket]:
        return [p for p in self.packets if not p.is_silence]

    def pcm(self, decrypt: Callable[[bytes], bytes] | None = None) -> bytes:
        """48 kHz s16le stereo: every payload decoded with opuslib in arrival order.

        Silence frames become 20 ms of zeros; a timestamp gap inside the recording is filled with
        zeros (no PLC). Duplicates (same timestamp as the previous packet) are skipped. A payload
        that does not decode (e.g. DAVE ciphertext with no ``decrypt``) becomes 20 ms of zeros.
        ``decrypt`` (e.g. a DAVE decryptor) is applied to non-silence payloads before decoding.
        """
        import opuslib  # the server's own decoder, independent of telecom's

        decoder = opuslib.Decoder(48000, 2)
        out = bytearray()
        prev_timestamp: int | None = None
        prev_samples = FRAME_SAMPLES
        for packet in self.packets:
            if prev_timestamp is not None:
                delta = (packet.timestamp - prev_timestamp) & 0xFFFFFFFF
                if delta == 0:
                    continue
                gap = delta - prev_samples
                if 0 < gap <= MAX_FILLED_GAP_SECONDS * 48000:
                    out += bytes(gap * 4)
            if packet.is_silence:
                chunk = _SILENCE_20MS
            else:
                try:
                    payload = decrypt(packet.payload) if decrypt is not None else packet.payload
                    chunk = decoder.decode(payload, 5760)
                except Exception:  # opuslib.OpusError, or the caller's decryptor refusing
                    chunk = _SILENCE_20MS
            out += chunk
            prev_timestamp = packet.timestamp
            prev_samples = len(chunk) // 4
        return bytes(out)


class StreamValidator:
    """Per-SSRC state for the rules in the module docstring; ``check`` returns violations found."""

    def __init__(self) -> None:
        self.reset()
        self.speaking_seen = False
        self.audio_before_speaking_reported = False
        self.pending_audio_before_speaking: tuple[float, int] | None = None  # (arrival, sequence)
        self.speaking_cleared_at: float | None = None  # last op 5 with speaking 0

    def reset(self) -> None:
        """New key or new SSRC: sequence, timestamp and nonce expectations start over."""
        self.last_sequence: int | None = None
        self.last_timestamp: int | None = None
        self.last_arrival: float | None = None
        self.last_was_silence = False
        self.last_counter: int | None = None
        self.seen_counters: set[int] = set()

    def on_speaking(self, speaking: int, arrival: float) -> None:
        if not speaking:
            self.speaking_cleared_at = arrival
        if speaking:
            self.speaking_seen = True
            pending = self.pending_audio_before_speaking
            if pending is not None and arrival - pending[0] <= SPEAKING_GRACE_SECONDS:
                self.pending_audio_before_speaking = None

    def due_audio_before_speaking(self, now: float | None = None) -> tuple[float, int] | None:
        """The pending audio-before-speaking once its grace has run out (then it is reported)."""
        pending = self.pending_audio_before_speaking
        if pending is None:
            return None
        now = time.monotonic() if now is None else now
        if now - pending[0] <= SPEAKING_GRACE_SECONDS:
            return None
        self.pending_audio_before_speaking = None
        self.audio_before_speaking_reported = True
        return pending

    def _timestamp_problem(self, packet: ReceivedPacket, record: StreamRecord) -> str | None:
        assert self.last_timestamp is not None and self.last_arrival is not None
        delta = (packet.timestamp - self.last_timestamp) & 0xFFFFFFFF
        elapsed = packet.arrival - self.last_arrival
        gap = elapsed > GAP_SECONDS
        frames = delta / FRAME_SAMPLES
        elapsed_frames = elapsed / FRAME_SECONDS
        matches_elapsed = (
            delta % FRAME_SAMPLES == 0 and delta > 0
            and abs(frames - elapsed_frames) <= GAP_TOLERANCE_FRAMES
        )
        if not self.last_was_silence:
            # Inside a talk spurt: +960, except that a stalled sender may resume late (+960,
            # counted) or pause without silence frames and keep its timeline (matches elapsed).
            if delta == FRAME_SAMPLES:
                if gap:
                    record.late_packets += 1
                return None
            if gap and matches_elapsed:
                return None
            return f"timestamp +{delta} inside a talk spurt ({elapsed * 1000:.0f} ms later), expected +960"
        # After a silence frame the spurt has ended: continuing at once is +960, a restart must
        # jump by the elapsed time. A late +960 with no Speaking 0 in between is a sender that
        # stalled after an underrun's silence frame (kept its timeline): counted late, as above.
        if (not gap and delta == FRAME_SAMPLES) or matches_elapsed:
            return None
        cleared = self.speaking_cleared_at
        if delta == FRAME_SAMPLES and (cleared is None or cleared < self.last_arrival):
            record.late_packets += 1
            return None
        return (
            f"timestamp +{delta} ({frames:.1f} frames) after {elapsed * 1000:.0f} ms "
            f"({elapsed_frames:.1f} frames) since the last silence frame"
        )

    def _lost_in_transit(self, packet: ReceivedPacket) -> int:
        """k − 1 when sequence, nonce and timestamp all moved on by k packets (2 ≤ k ≤ MAX_LOSS_RUN)."""
        if self.last_sequence is None or self.last_counter is None or self.last_timestamp is None:
            return 0
        k = (packet.sequence - self.last_sequence) & 0xFFFF
        if not 2 <= k <= MAX_LOSS_RUN:
            return 0
        if (packet.counter - self.last_counter) & 0xFFFFFFFF != k:
            return 0
        if (packet.timestamp - self.last_timestamp) & 0xFFFFFFFF != k * FRAME_SAMPLES:
            return 0
        return k - 1

    def check(self, packet: ReceivedPacket, record: StreamRecord) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        if packet.payload_type != 0x78:
            found.append(("payload_type", f"payload type {packet.payload_type}, expected 120 (0x78)"))

        counter = packet.counter
        lost = 0 if counter in self.seen_counters else self._lost_in_transit(packet)
        record.lost_packets += lost
        if counter in self.seen_counters:
            found.append(("nonce_reused", f"transport nonce counter {counter} used twice under one key"))
        elif self.last_counter is not None and not lost and counter != (self.last_counter + 1) & 0xFFFFFFFF:
            found.append(
                ("nonce_not_incrementing", f"nonce counter {counter} after {self.last_counter}")
            )
        self.seen_counters.add(counter)
        if len(self.seen_counters) > 1 << 20:  # bound memory on very long runs
            self.seen_counters.clear()
        self.last_counter = counter

        if self.last_sequence is not None:
            expected = (self.last_sequence + 1) & 0xFFFF
            if packet.sequence != expected and not lost:
                found.append(("sequence_jump", f"sequence {packet.sequence}, expected {expected}"))
        if self.last_timestamp is not None and self.last_arrival is not None and not lost:
            problem = self._timestamp_problem(packet, record)
            if problem:
                found.append(("timestamp_jump", problem))
        self.last_sequence = packet.sequence
        self.last_timestamp = packet.timestamp
        self.last_arrival = packet.arrival
        self.last_was_silence = packet.is_silence

        if (
            not packet.is_silence
            and not self.speaking_seen
            and not self.audio_before_speaking_reported
            and self.pending_audio_before_speaking is None
        ):
            self.pending_audio_before_speaking = (packet.arrival, packet.sequence)
        return found
