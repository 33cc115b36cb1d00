# C contract of telecom._fast.jitter: the per-SSRC jitter buffer the native receive loop owns.
#
# Clock-driven: the owner pushes packets as they arrive (jb_push) and pops exactly one 20 ms frame per
# tick (jb_pop). Everything is plain C on a caller-owned struct: no Python objects, no allocation, no
# errors raised, safe without the GIL. One thread at a time per jitter_t. The pure-Python twin
# telecom._twin.jitter implements the same algorithm step for step (it is the readable reference and
# the oracle the tests compare against).
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t

cdef enum:
    JB_SLOTS = 32             # reorder window in packets (640 ms); a power of two
    JB_SLOT_BYTES = 1400      # largest payload kept (Opus max frame 1275 B + DAVE overhead)
    JB_MAX_CONCEAL = 5        # frames concealed with nothing buffered before the spurt is over
    JB_ADAPT_CLEAN_POPS = 500 # 10 s without a late packet: the adaptive depth shrinks by one

    # jb_push results
    JB_ACCEPTED = 0
    JB_DUPLICATE = 1
    JB_LATE = 2
    JB_TOO_BIG = 3
    JB_RESET = 4              # accepted, after dropping the buffer (sequence jumped out of the window)

    # jb_pop kinds
    JB_NONE = 0               # nothing to play this tick (idle, or prefilling)
    JB_FRAME = 1              # a packet to decode
    JB_LOST = 2               # conceal one frame (fec: the next packet, when buffered, for in-band FEC)
    JB_END = 3                # the talk spurt is over (no audio this tick)

    # slot states
    JB_EMPTY = 0
    JB_FILLED = 1
    JB_PLAYED = 2
    JB_CONCEALED = 3

ctypedef struct jb_slot:
    uint8_t state
    uint16_t seq
    uint32_t ts
    int64_t arrival_ns
    int len
    unsigned char data[JB_SLOT_BYTES]

ctypedef struct jb_out:
    int kind
    uint16_t seq
    uint32_t ts
    int64_t time_ns          # where the frame belongs on the arrival clock (see jb_pop)
    bint spurt_start
    const unsigned char* payload   # valid until the next jb_push/jb_init on this buffer
    int len
    const unsigned char* fec
    int fec_len

ctypedef struct jitter_t:
    jb_slot slots[JB_SLOTS]
    bint started
    bint playing
    bint pending_end
    bint last_silence
    bint adaptive
    bint has_played
    uint16_t next_seq
    uint32_t last_ts
    uint32_t anchor_ts
    int64_t anchor_ns
    int count
    int idle_wait
    int miss_run
    int depth
    int min_depth
    int max_depth
    int clean_pops
    int64_t packets
    int64_t accepted
    int64_t duplicates
    int64_t late
    int64_t lost
    int64_t resets
    int64_t frames
    int64_t too_big

# depth: frames buffered before a talk spurt starts playing (prefill). adaptive: grow the depth by one
# per late packet up to max_depth, shrink by one after JB_ADAPT_CLEAN_POPS frames without one.
cdef void jb_init(jitter_t* jb, int depth, int min_depth, int max_depth, bint adaptive) noexcept nogil
cdef int jb_push(jitter_t* jb, uint16_t seq, uint32_t ts, const unsigned char* data, int n,
                 int64_t arrival_ns) noexcept nogil
cdef int jb_pop(jitter_t* jb, jb_out* out) noexcept nogil
