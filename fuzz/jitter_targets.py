"""Fuzz target for the jitter buffer: any sequence of pushes (sequence numbers near and across the
16-bit wrap, timestamps across the 32-bit wrap, duplicates, late and far-future packets, odd payload
sizes) and pops is applied to the compiled buffer and to its pure-Python twin, which must agree on
every answer and statistic, and never hold more than ``SLOTS`` packets.

The input bytes are a little program: each 8-byte step is ``op, dseq(i16), dts(i16 × 960 frames),
len, arrival(u8)``; see :func:`steps`.
"""

from __future__ import annotations

import struct

from telecom._twin import jitter as twin_jitter
from wire_targets import _load_fast  # honours TELECOM_FUZZ_LIB (an instrumented build)

fast_jitter = _load_fast("jitter")

_STEP = struct.Struct("<BhhBB")  # 7 bytes


class Disagreement(AssertionError):
    """The compiled jitter buffer and the twin answered differently."""


def steps(data: bytes):
    """Decode fuzz bytes into (op, seq, timestamp, payload, arrival_ns) steps."""
    if len(data) < 2:
        return [], (0, False)
    depth = data[0] % 8 + 1
    adaptive = bool(data[1] & 1)
    seq = 65500 + (data[1] >> 1)      # starts near the 16-bit wrap
    ts = (2**32 - 960 * 40) & 0xFFFFFFFF  # and near the 32-bit one
    now = 1_000_000_000
    out = []
    for off in range(2, len(data) - _STEP.size + 1, _STEP.size):
        op, dseq, dts, length, arrival = _STEP.unpack_from(data, off)
        now += arrival * 500_000  # 0..127 ms steps
        if op % 4 == 3:
            out.append(("pop", None, None, None, now))
            continue
        s = (seq + dseq % 300 - 150) & 0xFFFF if op % 4 == 2 else (seq + 1) & 0xFFFF
        t = (ts + 960 * (dts % 400 - 200)) & 0xFFFFFFFF if op % 4 == 2 else (ts + 960) & 0xFFFFFFFF
        if op % 4 != 2:
            seq, ts = s, t
        payload = bytes([op]) * (length % 200 + (1 if op & 0x80 else 0))
        out.append(("push", s, t, payload, now))
    return out, (depth, adaptive)


def _popped(p) -> tuple:
    return (p.kind, p.seq, p.timestamp, p.spurt_start, p.payload, p.fec)


def one_input(data: bytes) -> None:
    program, (depth, adaptive) = steps(data)
    if not program:
        return
    fast = fast_jitter.JitterBuffer(depth, adaptive=adaptive)
    twin = twin_jitter.JitterBuffer(depth, adaptive=adaptive)
    for i, (op, seq, ts, payload, now) in enumerate(program):
        if op == "push":
            a = _outcome(fast.push, seq, ts, payload, now)
            b = _outcome(twin.push, seq, ts, payload, now)
        else:
            a = _outcome(lambda: _popped(fast.pop()))
            b = _outcome(lambda: _popped(twin.pop()))
        if a != b:
            raise Disagreement(f"step {i} {op} seq={seq} ts={ts}: fast {a!r} vs twin {b!r}")
        if fast.buffered > fast_jitter.SLOTS:
            raise Disagreement(f"{fast.buffered} packets buffered, more than SLOTS={fast_jitter.SLOTS}")
    if fast.stats() != twin.stats():
        raise Disagreement(f"stats differ: {fast.stats()} vs {twin.stats()}")


def _outcome(fn, *args):
    try:
        return "ok", fn(*args)
    except ValueError as exc:  # e.g. an oversized payload: both must refuse it the same way
        return "error", type(exc).__name__
