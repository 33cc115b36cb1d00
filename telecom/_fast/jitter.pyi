"""Type stubs for telecom._fast.jitter (same API as telecom._twin.jitter)."""

from typing import NamedTuple

from typing_extensions import Buffer

SLOTS: int
SLOT_BYTES: int
MAX_CONCEAL: int

class Popped(NamedTuple):
    kind: str                 # "none", "frame", "lost", "end"
    seq: int | None
    timestamp: int | None
    time_ns: int | None
    spurt_start: bool
    payload: bytes | None
    fec: bytes | None

class JitterBuffer:
    def __init__(self, depth: int = 3, *, adaptive: bool = False, min_depth: int = 1,
                 max_depth: int = 10) -> None: ...
    def push(self, seq: int, timestamp: int, payload: Buffer, arrival_ns: int = 0) -> str: ...
    def pop(self) -> Popped: ...
    @property
    def depth(self) -> int: ...
    @property
    def buffered(self) -> int: ...
    @property
    def playing(self) -> bool: ...
    def stats(self) -> dict[str, int]: ...

def bench_push_pop(streams: int, ticks: int, payload_len: int = 160) -> int: ...
