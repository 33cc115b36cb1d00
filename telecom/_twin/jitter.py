"""The per-SSRC jitter buffer in pure Python: the readable reference of :mod:`telecom._fast.jitter`.

Same API, same algorithm, same results step for step (the tests run the same inputs through both and
compare every push status and every popped frame). It owns reordering by RTP sequence number, dropping
duplicates, counting late packets, the per-tick play/conceal/end decision and the arrival-clock
placement of frames. It decodes nothing and does no I/O.

How it works (one ``pop()`` per 20 ms tick):

- ``push``: the first packet fixes ``next_seq`` (the next sequence number to play). A packet behind it
  is a duplicate if its slot still holds it as played, otherwise late (dropped; an adaptive buffer
  grows its depth by one); but before anything has played, a packet up to 8 behind moves
  ``next_seq`` back to it (the stream's first packets arrived out of order). A packet ``SLOTS`` or
  more ahead, or far behind while idle and empty, resets the buffer. Otherwise it goes to slot
  ``seq % SLOTS`` unless that slot already holds it.
- ``pop`` while idle: wait until a contiguous run of ``depth`` packets is buffered or the oldest has
  waited ``depth`` ticks; then start the talk spurt at the first buffered packet and anchor it on the
  arrival clock at ``min(arrival - (ts - ts_first) / 48 kHz)`` over the buffered packets.
- ``pop`` while playing: the packet at ``next_seq`` (``frame``); if missing while later packets are
  buffered, ``lost`` (conceal; the next packet is offered for Opus in-band FEC); if nothing is
  buffered, ``end`` after a silence frame (the sender's 5-frame tail) or after ``MAX_CONCEAL``
  concealed frames, else ``lost``.
"""

from __future__ import annotations

from collections import namedtuple

from telecom.errors import ConfigurationError

__all__ = ["JitterBuffer", "Popped", "SLOTS", "SLOT_BYTES", "MAX_CONCEAL"]

SLOTS = 32
SLOT_BYTES = 1400
MAX_CONCEAL = 5
ADAPT_CLEAN_POPS = 500
SILENCE_FRAME = b"\xf8\xff\xfe"

EMPTY, FILLED, PLAYED, CONCEALED = 0, 1, 2, 3

Popped = namedtuple("Popped", "kind seq timestamp time_ns spurt_start payload fec")
_NOTHING = ("none", "end")


def seq_diff(a: int, b: int) -> int:
    """a - b for 16-bit sequence numbers, in -32768..32767."""
    d = (a - b) & 0xFFFF
    return d - 0x10000 if d >= 0x8000 else d


def ts_to_ns(ts: int, anchor: int) -> int:
    """(ts - anchor) as signed 32-bit samples at 48 kHz, in ns, truncated toward zero like C."""
    d = (ts - anchor) & 0xFFFFFFFF
    if d >= 0x80000000:
        d -= 0x100000000
    q = abs(d) * 62500 // 3
    return -q if d < 0 else q


class _Slot:
    __slots__ = ("state", "seq", "ts", "arrival_ns", "data")

    def __init__(self) -> None:
        self.state = EMPTY
        self.seq = 0
        self.ts = 0
        self.arrival_ns = 0
        self.data = b""


class JitterBuffer:
    """One SSRC's jitter buffer. ``depth``: frames buffered before a talk spurt starts playing.

    >>> jb = JitterBuffer(depth=2)
    >>> jb.push(7, 960 * 7, b"a"), jb.push(8, 960 * 8, b"b")
    ('accepted', 'accepted')
    >>> jb.pop().kind
    'frame'
    """

    def __init__(self, depth: int = 3, *, adaptive: bool = False, min_depth: int = 1,
                 max_depth: int = 10) -> None:
        if not 1 <= min_depth <= depth <= max_depth <= SLOTS - 2:
            raise ConfigurationError(
                f"need 1 <= min_depth <= depth <= max_depth <= {SLOTS - 2}, "
                f"not {min_depth}, {depth}, {max_depth}")
        self._slots = [_Slot() for _ in range(SLOTS)]
        self._depth, self._min_depth, self._max_depth = depth, min_depth, max_depth
        self._adaptive = bool(adaptive)
        self._started = self._playing = self._pending_end = self._last_silence = False
        self._has_played = False
        self._next_seq = 0
        self._last_ts = self._anchor_ts = self._anchor_ns = 0
        self._count = self._idle_wait = self._miss_run = self._clean_pops = 0
        self._stats = dict.fromkeys(
            ("packets", "accepted", "duplicates", "late", "lost", "resets", "frames", "too_big"), 0)

    # -- push -------------------------------------------------------------------------------------
    def _reset(self, seq: int) -> None:
        for slot in self._slots:
            slot.state = EMPTY
        self._count = 0
        if self._playing:
            self._pending_end = True
        self._playing = False
        self._idle_wait = self._miss_run = 0
        self._next_seq = seq
        self._has_played = False
        self._stats["resets"] += 1

    def push(self, seq: int, timestamp: int, payload: bytes, arrival_ns: int = 0) -> str:
        """Store one packet; returns "accepted", "duplicate", "late", "too_big" or "reset"."""
        if not 0 <= seq <= 0xFFFF or not 0 <= timestamp <= 0xFFFFFFFF:
            raise ConfigurationError("seq must be 0..65535 and timestamp 0..2^32-1")
        payload = bytes(payload)
        st = self._stats
        st["packets"] += 1
        if len(payload) > SLOT_BYTES:
            st["too_big"] += 1
            return "too_big"
        if not self._started:
            self._started = True
            self._next_seq = seq
        status = "accepted"
        d = seq_diff(seq, self._next_seq)
        if d < 0 and not self._has_played and d >= -(SLOTS // 4) and \
                self._slots[seq % SLOTS].state != FILLED:
            # Nothing played yet: the stream's first packets arrived out of order. Start earlier.
            self._next_seq = seq
            d = 0
        if d < 0:
            if not self._playing and self._count == 0 and d < -SLOTS:
                self._reset(seq)
                status = "reset"
            else:
                slot = self._slots[seq % SLOTS]
                if d >= -SLOTS and slot.seq == seq and slot.state == PLAYED:
                    st["duplicates"] += 1
                    return "duplicate"
                st["late"] += 1
                if self._adaptive and self._depth < self._max_depth:
                    self._depth += 1
                self._clean_pops = 0
                return "late"
        elif d >= SLOTS:
            self._reset(seq)
            status = "reset"
        slot = self._slots[seq % SLOTS]
        if slot.state == FILLED and slot.seq == seq:
            st["duplicates"] += 1
            return "duplicate"
        slot.state, slot.seq, slot.ts = FILLED, seq, timestamp
        slot.arrival_ns, slot.data = arrival_ns, payload
        self._count += 1
        st["accepted"] += 1
        return status

    # -- pop --------------------------------------------------------------------------------------
    def _filled(self, seq: int) -> _Slot | None:
        slot = self._slots[seq % SLOTS]
        return slot if slot.state == FILLED and slot.seq == seq else None

    def pop(self) -> Popped:
        """The next tick's decision: ``Popped(kind, seq, timestamp, time_ns, spurt_start, payload, fec)``."""
        if self._pending_end:
            self._pending_end = False
            return Popped("end", None, None, None, False, None, None)
        spurt_start = False
        if not self._playing:
            if self._count == 0:
                return Popped("none", None, None, None, False, None, None)
            self._idle_wait += 1
            offsets = [i for i in range(SLOTS) if self._filled((self._next_seq + i) & 0xFFFF)]
            if not offsets:
                self._count = 0
                return Popped("none", None, None, None, False, None, None)
            first = offsets[0]
            run = 1
            while run < len(offsets) and offsets[run] == first + run:
                run += 1
            # A contiguous run (not merely a span: a packet that overtook others proves nothing
            # about the ones still missing) of depth packets, or the oldest having waited depth ticks.
            if run < self._depth and self._idle_wait < self._depth:
                return Popped("none", None, None, None, False, None, None)
            self._stats["lost"] += first  # never arrived before the spurt began: not concealed
            self._next_seq = (self._next_seq + first) & 0xFFFF
            head = self._filled(self._next_seq)
            self._anchor_ts, self._anchor_ns = head.ts, head.arrival_ns
            for i in offsets:
                slot = self._filled((self._next_seq + i - first) & 0xFFFF)
                if slot is not None:
                    self._anchor_ns = min(self._anchor_ns,
                                          slot.arrival_ns - ts_to_ns(slot.ts, self._anchor_ts))
            self._playing = True
            self._idle_wait = self._miss_run = 0
            spurt_start = True
        self._has_played = True
        slot = self._filled(self._next_seq)
        if slot is not None:
            slot.state = PLAYED
            self._count -= 1
            self._last_ts = slot.ts
            self._miss_run = 0
            self._last_silence = slot.data == SILENCE_FRAME
            self._next_seq = (self._next_seq + 1) & 0xFFFF
            self._stats["frames"] += 1
            self._clean_pops += 1
            if self._adaptive and self._clean_pops >= ADAPT_CLEAN_POPS:
                self._clean_pops = 0
                if self._depth > self._min_depth:
                    self._depth -= 1
            return Popped("frame", slot.seq, slot.ts, self._anchor_ns + ts_to_ns(slot.ts, self._anchor_ts),
                          spurt_start, slot.data, None)
        if self._count == 0 and (self._last_silence or self._miss_run >= MAX_CONCEAL):
            self._playing = False
            self._idle_wait = 0
            return Popped("end", None, None, None, False, None, None)
        self._miss_run += 1
        self._stats["lost"] += 1
        self._last_ts = (self._last_ts + 960) & 0xFFFFFFFF
        slot = self._slots[self._next_seq % SLOTS]
        slot.state, slot.seq = CONCEALED, self._next_seq
        seq = self._next_seq
        following = self._filled((seq + 1) & 0xFFFF)
        self._next_seq = (seq + 1) & 0xFFFF
        return Popped("lost", seq, self._last_ts, self._anchor_ns + ts_to_ns(self._last_ts, self._anchor_ts),
                      spurt_start, None, following.data if following is not None else None)

    # -- state --------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return self._depth

    @property
    def buffered(self) -> int:
        return self._count

    @property
    def playing(self) -> bool:
        return self._playing

    def stats(self) -> dict[str, int]:
        return dict(self._stats, depth=self._depth, buffered=self._count)
