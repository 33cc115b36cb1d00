# cython: language_level=3
"""The per-SSRC jitter buffer of the receive path, compiled (C core + a thin Python wrapper).

What it owns: reordering packets by RTP sequence number, dropping duplicates, counting late packets,
deciding per 20 ms tick whether to play a frame, conceal a lost one (PLC, with the next packet offered
for Opus in-band FEC) or end the talk spurt, and placing every frame on the arrival clock (the
``time_ns`` the muxer uses). Sequence numbers and timestamps are compared with wrap-around arithmetic
(16 and 32 bits). It decodes nothing and does no I/O.

Algorithm (identical in the twin ``telecom._twin.jitter``, which is the readable reference):

- ``push``: the first packet fixes ``next_seq``. A packet behind ``next_seq`` is a duplicate when its
  slot still holds it as played, else late (dropped; the adaptive depth grows); but before anything
  has played, a packet up to 8 behind moves ``next_seq`` back to it. A packet 32 or more ahead (or
  far behind while idle and empty) resets the buffer. Otherwise it is stored in slot ``seq % 32``
  unless that slot already holds it (duplicate).
- ``pop`` (one call per tick): while idle, wait until a contiguous run of ``depth`` packets is
  buffered or the oldest has waited ``depth`` ticks, then start the spurt at the first buffered
  packet, anchoring it at the earliest arrival (``arrival - (ts - ts_first) / 48 kHz``). While
  playing, return the packet at ``next_seq``; if it is missing but something later is buffered,
  conceal it (``lost``); if nothing is buffered, end the spurt after a silence frame (``F8 FF FE``,
  the sender's 5-frame tail) or after
  ``JB_MAX_CONCEAL`` concealed frames.
"""

cimport cython
from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset
from cpython.bytes cimport PyBytes_FromStringAndSize

from collections import namedtuple

from telecom.errors import ConfigurationError

__all__ = ["JitterBuffer", "Popped", "SLOTS", "SLOT_BYTES", "MAX_CONCEAL"]

SLOTS = JB_SLOTS
SLOT_BYTES = JB_SLOT_BYTES
MAX_CONCEAL = JB_MAX_CONCEAL

Popped = namedtuple("Popped", "kind seq timestamp time_ns spurt_start payload fec")

_PUSH_NAMES = {JB_ACCEPTED: "accepted", JB_DUPLICATE: "duplicate", JB_LATE: "late",
               JB_TOO_BIG: "too_big", JB_RESET: "reset"}
_POP_NAMES = {JB_NONE: "none", JB_FRAME: "frame", JB_LOST: "lost", JB_END: "end"}


cdef inline int _seq_diff(uint16_t a, uint16_t b) noexcept nogil:
    return <int>(<short>(<uint16_t>(a - b)))


@cython.cdivision(True)
cdef inline int64_t _ts_to_ns(uint32_t ts, uint32_t anchor) noexcept nogil:
    # 48 kHz samples -> ns, truncated toward zero (the twin does the same)
    cdef int64_t d = <int32_t>(<uint32_t>(ts - anchor))
    return (d * 62500) // 3


cdef inline bint _is_silence(const unsigned char* p, int n) noexcept nogil:
    return n == 3 and p[0] == 0xF8 and p[1] == 0xFF and p[2] == 0xFE


cdef void jb_init(jitter_t* jb, int depth, int min_depth, int max_depth, bint adaptive) noexcept nogil:
    memset(jb, 0, sizeof(jitter_t))
    if min_depth < 1:
        min_depth = 1
    if max_depth > JB_SLOTS - 2:
        max_depth = JB_SLOTS - 2
    if max_depth < min_depth:
        max_depth = min_depth
    if depth < min_depth:
        depth = min_depth
    if depth > max_depth:
        depth = max_depth
    jb.depth = depth
    jb.min_depth = min_depth
    jb.max_depth = max_depth
    jb.adaptive = adaptive


cdef inline void _reset(jitter_t* jb, uint16_t seq) noexcept nogil:
    cdef int i
    for i in range(JB_SLOTS):
        jb.slots[i].state = JB_EMPTY
    jb.count = 0
    if jb.playing:
        jb.pending_end = True
    jb.playing = False
    jb.idle_wait = 0
    jb.miss_run = 0
    jb.next_seq = seq
    jb.has_played = False
    jb.resets += 1


cdef int jb_push(jitter_t* jb, uint16_t seq, uint32_t ts, const unsigned char* data, int n,
                 int64_t arrival_ns) noexcept nogil:
    cdef int d, status = JB_ACCEPTED
    cdef jb_slot* s
    jb.packets += 1
    if n > JB_SLOT_BYTES or n < 0:
        jb.too_big += 1
        return JB_TOO_BIG
    if not jb.started:
        jb.started = True
        jb.next_seq = seq
    d = _seq_diff(seq, jb.next_seq)
    if d < 0 and not jb.has_played and d >= -(JB_SLOTS // 4) and \
            jb.slots[seq & (JB_SLOTS - 1)].state != JB_FILLED:
        # Nothing played yet: the stream's first packets arrived out of order. Start earlier.
        jb.next_seq = seq
        d = 0
    if d < 0:
        if not jb.playing and jb.count == 0 and d < -JB_SLOTS:
            _reset(jb, seq)
            status = JB_RESET
        else:
            s = &jb.slots[seq & (JB_SLOTS - 1)]
            if d >= -JB_SLOTS and s.seq == seq and s.state == JB_PLAYED:
                jb.duplicates += 1
                return JB_DUPLICATE
            jb.late += 1
            if jb.adaptive and jb.depth < jb.max_depth:
                jb.depth += 1
            jb.clean_pops = 0
            return JB_LATE
    elif d >= JB_SLOTS:
        _reset(jb, seq)
        status = JB_RESET
    s = &jb.slots[seq & (JB_SLOTS - 1)]
    if s.state == JB_FILLED and s.seq == seq:
        jb.duplicates += 1
        return JB_DUPLICATE
    s.state = JB_FILLED
    s.seq = seq
    s.ts = ts
    s.arrival_ns = arrival_ns
    s.len = n
    if n:
        memcpy(s.data, data, n)
    jb.count += 1
    jb.accepted += 1
    return status


cdef inline jb_slot* _filled(jitter_t* jb, uint16_t seq) noexcept nogil:
    cdef jb_slot* s = &jb.slots[seq & (JB_SLOTS - 1)]
    if s.state == JB_FILLED and s.seq == seq:
        return s
    return NULL


cdef int jb_pop(jitter_t* jb, jb_out* out) noexcept nogil:
    cdef int i, first = -1, last = -1, run = 0
    cdef bint run_done = False
    cdef jb_slot* s
    cdef jb_slot* nxt
    cdef int64_t t
    memset(out, 0, sizeof(jb_out))
    if jb.pending_end:
        jb.pending_end = False
        out.kind = JB_END
        return JB_END
    if not jb.playing:
        if jb.count == 0:
            return JB_NONE
        jb.idle_wait += 1
        for i in range(JB_SLOTS):
            if _filled(jb, <uint16_t>(jb.next_seq + i)) != NULL:
                if first < 0:
                    first = i
                elif last != i - 1:
                    run_done = True
                if not run_done:
                    run = i - first + 1
                last = i
        if first < 0:       # cannot happen while count > 0; keep the state sane anyway
            jb.count = 0
            return JB_NONE
        # A contiguous run (not merely a span: a packet that overtook others proves nothing about
        # the ones still missing) of depth packets, or the oldest having waited depth ticks.
        if run < jb.depth and jb.idle_wait < jb.depth:
            return JB_NONE
        # Packets before the first buffered one never arrived: lost, but not concealed (no audio
        # existed yet in this spurt to continue from).
        jb.lost += first
        jb.next_seq = <uint16_t>(jb.next_seq + first)
        s = _filled(jb, jb.next_seq)
        jb.anchor_ts = s.ts
        jb.anchor_ns = s.arrival_ns
        for i in range(first, last + 1):
            nxt = _filled(jb, <uint16_t>(jb.next_seq + i - first))
            if nxt != NULL:
                t = nxt.arrival_ns - _ts_to_ns(nxt.ts, jb.anchor_ts)
                if t < jb.anchor_ns:
                    jb.anchor_ns = t
        jb.playing = True
        jb.idle_wait = 0
        jb.miss_run = 0
        out.spurt_start = True
    jb.has_played = True
    s = _filled(jb, jb.next_seq)
    if s != NULL:
        s.state = JB_PLAYED
        jb.count -= 1
        jb.last_ts = s.ts
        jb.miss_run = 0
        jb.last_silence = _is_silence(s.data, s.len)
        out.kind = JB_FRAME
        out.seq = s.seq
        out.ts = s.ts
        out.payload = s.data
        out.len = s.len
        out.time_ns = jb.anchor_ns + _ts_to_ns(s.ts, jb.anchor_ts)
        jb.next_seq = <uint16_t>(jb.next_seq + 1)
        jb.frames += 1
        jb.clean_pops += 1
        if jb.adaptive and jb.clean_pops >= JB_ADAPT_CLEAN_POPS:
            jb.clean_pops = 0
            if jb.depth > jb.min_depth:
                jb.depth -= 1
        return JB_FRAME
    if jb.count == 0 and (jb.last_silence or jb.miss_run >= JB_MAX_CONCEAL):
        jb.playing = False
        jb.idle_wait = 0
        out.kind = JB_END
        return JB_END
    jb.miss_run += 1
    jb.lost += 1
    jb.last_ts = <uint32_t>(jb.last_ts + 960)
    s = &jb.slots[jb.next_seq & (JB_SLOTS - 1)]
    s.state = JB_CONCEALED
    s.seq = jb.next_seq
    out.kind = JB_LOST
    out.seq = jb.next_seq
    out.ts = jb.last_ts
    out.time_ns = jb.anchor_ns + _ts_to_ns(jb.last_ts, jb.anchor_ts)
    nxt = _filled(jb, <uint16_t>(jb.next_seq + 1))
    if nxt != NULL:
        out.fec = nxt.data
        out.fec_len = nxt.len
    jb.next_seq = <uint16_t>(jb.next_seq + 1)
    return JB_LOST


cdef class JitterBuffer:
    """One SSRC's jitter buffer (Python face of the C core; same API as ``telecom._twin.jitter``).

    >>> jb = JitterBuffer(depth=2)
    >>> jb.push(7, 960 * 7, b"a"); jb.push(8, 960 * 8, b"b")
    'accepted'
    'accepted'
    >>> jb.pop().kind
    'frame'
    """

    cdef jitter_t* _jb

    def __cinit__(self):
        self._jb = <jitter_t*>calloc(1, sizeof(jitter_t))
        if self._jb == NULL:
            raise MemoryError()

    def __init__(self, int depth=3, *, bint adaptive=False, int min_depth=1, int max_depth=10):
        if not 1 <= min_depth <= depth <= max_depth <= JB_SLOTS - 2:
            raise ConfigurationError(
                f"need 1 <= min_depth <= depth <= max_depth <= {JB_SLOTS - 2}, "
                f"not {min_depth}, {depth}, {max_depth}")
        jb_init(self._jb, depth, min_depth, max_depth, adaptive)

    def __dealloc__(self):
        free(self._jb)

    def push(self, int seq, long long timestamp, const unsigned char[::1] payload not None,
             long long arrival_ns=0):
        """Store one packet; returns "accepted", "duplicate", "late", "too_big" or "reset"."""
        if not 0 <= seq <= 0xFFFF or not 0 <= timestamp <= 0xFFFFFFFF:
            raise ConfigurationError("seq must be 0..65535 and timestamp 0..2^32-1")
        cdef int n = payload.shape[0]
        cdef const unsigned char* p = &payload[0] if n else NULL
        return _PUSH_NAMES[jb_push(self._jb, <uint16_t>seq, <uint32_t>timestamp, p, n, arrival_ns)]

    def pop(self):
        """The next tick's decision: ``Popped(kind, seq, timestamp, time_ns, spurt_start, payload, fec)``."""
        cdef jb_out out
        cdef int kind = jb_pop(self._jb, &out)
        payload = fec = None
        if kind == JB_NONE or kind == JB_END:
            return Popped(_POP_NAMES[kind], None, None, None, False, None, None)
        if kind == JB_FRAME:
            payload = PyBytes_FromStringAndSize(<const char*>out.payload, out.len)
        elif out.fec != NULL:
            fec = PyBytes_FromStringAndSize(<const char*>out.fec, out.fec_len)
        return Popped(_POP_NAMES[kind], out.seq, out.ts, out.time_ns, bool(out.spurt_start), payload, fec)

    @property
    def depth(self):
        return self._jb.depth

    @property
    def buffered(self):
        return self._jb.count

    @property
    def playing(self):
        return bool(self._jb.playing)

    def stats(self):
        cdef jitter_t* jb = self._jb
        return {"packets": jb.packets, "accepted": jb.accepted, "duplicates": jb.duplicates,
                "late": jb.late, "lost": jb.lost, "resets": jb.resets, "frames": jb.frames,
                "too_big": jb.too_big, "depth": jb.depth, "buffered": jb.count}


def bench_push_pop(int streams, int ticks, int payload_len=160):
    """Benchmark helper: ``streams`` jitter buffers, one in-order packet pushed and one frame popped
    per stream per tick, all in C without the GIL; returns the nanoseconds spent (CLOCK_MONOTONIC)."""
    import time
    cdef jitter_t* jbs = <jitter_t*>calloc(streams, sizeof(jitter_t))
    cdef unsigned char payload[JB_SLOT_BYTES]
    cdef jb_out out
    cdef int s, t
    cdef long long t0, t1
    if jbs == NULL:
        raise MemoryError()
    if not 0 < payload_len <= JB_SLOT_BYTES:
        free(jbs)
        raise ConfigurationError(f"payload_len must be 1..{JB_SLOT_BYTES}")
    memset(payload, 0x55, payload_len)
    for s in range(streams):
        jb_init(&jbs[s], 3, 1, 10, True)
    t0 = time.monotonic_ns()
    with nogil:
        for t in range(ticks):
            for s in range(streams):
                jb_push(&jbs[s], <uint16_t>(s * 1000 + t), <uint32_t>(t * 960), payload, payload_len,
                        <int64_t>t * 20000000)
                jb_pop(&jbs[s], &out)
    t1 = time.monotonic_ns()
    free(jbs)
    return t1 - t0
