"""The receive path's per-SSRC jitter buffer: reorder, drop duplicates, count late packets, decide per
20 ms tick whether to play, conceal or end a talk spurt.

Picks the compiled implementation (:mod:`telecom._fast.jitter`) unless ``TELECOM_NO_EXTENSIONS=1``,
then the pure-Python twin (:mod:`telecom._twin.jitter`, the readable reference); both have the same
API and results. ``IMPLEMENTATION`` says which one is in use ("fast" or "twin"). The native receive
loop uses the C core directly; this module is for tools, tests and the curious.

>>> from telecom.jitter import JitterBuffer
>>> jb = JitterBuffer(depth=1); jb.push(65535, 0, b"x")
'accepted'
>>> jb.pop().seq
65535
"""

from __future__ import annotations

from telecom._fast import NO_EXTENSIONS, load

if NO_EXTENSIONS:
    from telecom._twin import jitter as _impl

    IMPLEMENTATION = "twin"
else:
    _impl = load("jitter")
    IMPLEMENTATION = "fast"

JitterBuffer = _impl.JitterBuffer
Popped = _impl.Popped
SLOTS = _impl.SLOTS
SLOT_BYTES = _impl.SLOT_BYTES
MAX_CONCEAL = _impl.MAX_CONCEAL

__all__ = ["IMPLEMENTATION", "JitterBuffer", "Popped", "SLOTS", "SLOT_BYTES", "MAX_CONCEAL"]
