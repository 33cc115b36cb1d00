# cython: language_level=3
"""The native media engine: a few scheduler threads that send audio for every connection of the process.

What it owns: the per-connection send state (SSRC, sequence, timestamp, transport nonce counter,
AEAD key, Opus encoder, volume, an optional frame encryptor), the ring buffers of the playables
attached to it (s16le PCM, or ready 20 ms Opus packets), and the threads that tick every 20 ms on
absolute deadlines. Each tick a thread walks its connections and *prepares* every frame (mix with
ramped volume -> Opus encode, or take an Opus packet as it is -> RTP header -> AEAD seal), then sends
them back to back in a second pass. The whole tick runs without the GIL; Python only enqueues changes
(attach a source, change a volume, confirm Speaking) under short per-object mutexes.

What it must not do: any signalling. When a connection is about to start a talk spurt it raises an
``EV_SPEAKING_START`` event and waits for :meth:`NativeConnection.confirm_speaking` (the io thread sends
op 5 first); after the 5-frame silence tail it raises ``EV_SPEAKING_STOP``. Events go through a bounded
queue and an eventfd the io loop watches; when the queue is full, events are counted as dropped.

Opus passthrough: when the only source with a frame this tick is an :class:`OpusSource` and the
client and playable gains are exactly 1.0 (no ramp in progress), its packet goes out as it came.
Otherwise the packet is decoded (a per-source decoder, created on first need) and mixed/re-encoded.
The choice is made per tick, so switching either way loses no frame and keeps seq/timestamp
contiguous. A decoder created after a passthrough run starts cold: its first frame may carry a short
transient (Opus has no keyframes; the PLC state of the skipped packets is unknown).

Frame encryptor (the DAVE hook): connections with ``set_frame_encryptor(fn)`` have their non-silence
Opus payloads passed through ``fn`` before RTP + AEAD. They are prepared in their own send phase, and
each phase's payloads are handed to ``fn`` under one GIL hold (sliced at ``HOOK_SLICE`` frames): at
most a few short holds per tick, never once per packet. A raising
``fn`` drops that frame (no sequence number is used), counts it, and raises an
``EV_FRAME_ENCRYPTOR_ERROR`` event at the start of each failure streak.

Scale: every connection is given one of ``PHASES`` (8) send times 2.5 ms apart (round-robin), so a
busy thread works in eight smaller bursts, each measured against its own deadline, instead of one
burst whose tail is late (a thread at 100 % load has 2.5 ms of work per phase, under the 5 ms limit).
Idle connections (no sources, Speaking idle) are skipped with two atomic loads and no lock. Each
connection keeps an EWMA of its prepare time; each thread an EWMA of its tick time. A new connection
goes to the thread with the least measured load, and once a second a thread that carries clearly
more than another hands it connections worth half the difference, between two ticks (``_shed``).
Every connection has its own UDP socket, so there is nothing to batch across connections with
``sendmmsg`` (and ``sendmmsg`` of one datagram measured no faster than ``send``,
bench/bench_engine.py); the send pass issues one ``send`` per connection right after the prepare
pass.

Timing rules (spec §2.6, PERFORMANCE.md): deadlines are ``epoch + n * 20 ms`` on CLOCK_MONOTONIC, so
the schedule never drifts; the RTP timestamp of a connection is derived from the tick number, so after
a pause it jumps by exactly the elapsed time; a late tick sends its frames late rather than skipping
them (only a stall longer than ``MAX_CATCHUP_TICKS`` resynchronises, and counts the skipped ticks).

Work ahead (``MediaEngine(work_ahead=True)``, the default): in the time left after a phase's sends, a
thread prepares and seals that phase's frames of the next tick, for connections whose sources already
hold them. A stall then costs only the sends of the frames it delayed, not a backlog of encodes that a
busy thread clears at its spare rate (see ``_ahead``).
"""

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.ref cimport PyObject, Py_XDECREF, Py_XINCREF
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset

from telecom._fast.aead cimport (
    AEAD_OVERHEAD,
    MODE_AES256_GCM_RTPSIZE,
    MODE_XCHACHA20_POLY1305_RTPSIZE,
    aead_clear,
    aead_init,
    aead_seal,
    aead_state,
)
from telecom._fast.includes.opus cimport (
    OPUS_APPLICATION_AUDIO,
    OpusDecoder,
    OpusEncoder,
    opus_decode,
    opus_decoder_create,
    opus_decoder_destroy,
    opus_encode,
    opus_encoder_create,
    opus_encoder_destroy,
    opus_packet_get_nb_samples,
    tc_opus_set_bitrate,
    tc_opus_set_complexity,
    tc_opus_set_inband_fec,
    tc_opus_set_packet_loss_perc,
)
from telecom._fast.mixer cimport mix_accumulate, mix_clear, mix_saturate
from telecom._fast.rtp cimport RTP_HEADER_SIZE, rtp_write_header

import logging

from telecom.errors import CodecError, ConfigurationError, TelecomError

_log = logging.getLogger("telecom.engine")


cdef extern from "engine_support.h" nogil:
    ctypedef struct tc_mutex:
        pass
    int tc_mutex_init(tc_mutex* m)
    void tc_mutex_destroy(tc_mutex* m)
    void tc_mutex_lock(tc_mutex* m)
    void tc_mutex_unlock(tc_mutex* m)
    int64_t tc_now_ns()
    void tc_sleep_until_ns(int64_t deadline)
    void tc_set_timer_slack_1ns()
    int tc_atomic_load_int(int* p)
    void tc_atomic_store_int(int* p, int v)
    int tc_atomic_add_int(int* p, int v)
    int64_t tc_atomic_load64(int64_t* p)
    void tc_atomic_store64(int64_t* p, int64_t v)
    void tc_atomic_add64(int64_t* p, int64_t v)
    int64_t tc_atomic_take64(int64_t* p)
    int tc_eventfd()
    void tc_eventfd_signal(int fd)
    void tc_eventfd_drain(int fd)
    int tc_send_dgram(int fd, const unsigned char* buf, size_t length)
    int tc_send_mmsg1(int fd, const unsigned char* buf, size_t length)
    int tc_set_realtime(int priority)


cdef extern from "unistd.h" nogil:
    int close(int fd)


cdef enum:
    FRAME_SAMPLES = 960            # per channel, 20 ms at 48 kHz
    CHANNELS = 2
    FRAME_VALUES = 1920            # int16 values in one stereo frame
    FRAME_BYTES = 3840
    MAX_OPUS_BYTES = 1275          # the largest single Opus frame (RFC 6716 §3.2.1)
    MAX_PACKET_BYTES = 1400
    MAX_PAYLOAD_BYTES = 1368       # MAX_PACKET_BYTES - RTP header - AEAD tag and counter
    MAX_SOURCES = 16               # playables mixed on one connection
    SILENCE_TAIL = 5               # spec §2.5: five silence frames before going quiet
    EVENT_QUEUE = 4096
    MAX_CATCHUP_TICKS = 50         # behind by more than 1 s: resynchronise instead of bursting
    LATE_NS = 5000000              # a frame sent more than 5 ms after its deadline is "late"
    TICK_NS = 20000000             # 20 ms
    HOOK_SLICE = 64                # frames per GIL hold in the frame-encryptor pass
    PHASES = 8                     # send times per tick a connection can be given (PHASE_NS apart)
    PHASE_NS = 2500000
    IDLE_WEIGHT_NS = 100           # placement: what an idle connection is assumed to cost per tick
    NEW_CONN_NS = 2000             # placement: cost assumed for a connection not yet measured
    REBALANCE_TICKS = 50           # a media thread considers handing connections over once a second
    REBALANCE_MIN_NS = 500000      # ... when it carries 0.5 ms per tick (2.5 % of a core) more than another
    REBALANCE_MIN_PCT = 25         # ... and a quarter more than its own load (noise must not swing them back)
    MOVE_COOLDOWN_TICKS = 500      # a connection handed over stays where it went for 10 s
    MOVE_MIN_COST_NS = 500         # connections that cost less per tick than this are not worth moving
    MAX_MOVES = 256                # connections handed over at once
    TAP_FRAMES = 32                # self-tap ring: 640 ms of what a connection sent, drained every 20 ms
    LATE_BUCKETS = 9               # send lateness histogram: the edges below, then +Inf

# Upper edges (ns) of the send-lateness histogram's buckets (Prometheus-style "le"; the last is +Inf).
cdef int64_t LATE_EDGES_NS[8]
LATE_EDGES_NS[:] = [500000, 1000000, 2000000, 5000000, 10000000, 20000000, 50000000, 100000000]

# Source states (also exported to Python below).
cdef enum:
    SRC_PLAYING = 1
    SRC_PAUSED = 2
    SRC_STOPPED = 3
    SRC_ENDED = 4

# Source kinds: what the ring holds.
cdef enum:
    KIND_PCM = 0         # s16le stereo bytes, cut into 3840-byte frames
    KIND_OPUS = 1        # Opus packets of 20 ms, each stored as a 2-byte length + the packet

# Speaking state of a connection.
cdef enum:
    SPK_IDLE = 0         # quiet, Speaking cleared
    SPK_REQUESTED = 1    # waiting for the io thread to send op 5
    SPK_ACTIVE = 2       # may send audio from speaking_ok_tick on

# What the payload prepared in this tick is.
cdef enum:
    PL_NONE = 0
    PL_ENCODED = 1       # mixed and encoded here
    PL_PASSTHROUGH = 2   # a source's Opus packet as given
    PL_SILENCE = 3       # F8 FF FE

# Event kinds.
cdef enum:
    EV_SPEAKING_START = 1
    EV_SPEAKING_STOP = 2
    EV_SOURCE_ENDED = 3
    EV_SEND_ERROR = 4
    EV_ENCODE_ERROR = 5
    EV_FRAME_ENCRYPTOR_ERROR = 6

cdef unsigned char SILENCE_FRAME[3]
SILENCE_FRAME[0] = 0xF8
SILENCE_FRAME[1] = 0xFF
SILENCE_FRAME[2] = 0xFE


ctypedef struct source_t:
    tc_mutex lock
    int64_t id
    int refcount                 # Python wrapper + each attached connection
    int kind                     # KIND_PCM or KIND_OPUS
    unsigned char* buf           # byte ring (PCM bytes, or length-prefixed Opus packets)
    Py_ssize_t cap
    Py_ssize_t rpos
    Py_ssize_t fill
    int npackets                 # KIND_OPUS: whole packets in the ring
    int max_packets              # KIND_OPUS: the ring's packet limit (its length in 20 ms frames)
    int state
    int input_ended              # no more data will come: drain, then end
    float gain_target
    float gain_current
    int64_t frames_played
    int64_t underruns
    OpusDecoder* dec             # KIND_OPUS: created on the first packet that must be mixed
    int64_t passthrough_frames   # KIND_OPUS: packets sent as they came
    int64_t decoded_frames       # KIND_OPUS: packets decoded to be mixed / re-encoded
    int64_t decode_errors


ctypedef struct tap_t:
    # What a connection sends, as PCM, for an include_self muxer: written by the media thread,
    # drained by Python (NativeConnection.tap_read).
    tc_mutex lock
    int head                     # the next slot written
    int count                    # frames not yet read
    int64_t dropped              # frames overwritten before Python read them
    int64_t ticks[TAP_FRAMES]
    int16_t pcm[TAP_FRAMES * FRAME_VALUES]


ctypedef struct conn_t:
    # read without the lock by the idle check: keep them first (one cache line per idle connection)
    int nsources
    int speaking
    int closing                  # the owning thread frees it at its next tick
    int has_encryptor            # a frame encryptor is set (the object itself is only touched with the GIL)
    int64_t cost_ns              # EWMA of this connection's prepare time
    int phase                    # which of the tick's PHASES sends this connection's packet
    int64_t prepared_tick        # the tick whose frame is prepared (sent at its phase)
    int thread                   # the media thread that owns it (changes when it is handed over)
    int64_t moved_tick           # when it was last handed over (0: never)
    int64_t handed_tick          # the last tick its previous thread handled, until the new one takes it (-1)
    tc_mutex lock
    int64_t id
    int configured               # socket + key present: may send
    int fd
    uint32_t ssrc
    uint16_t seq
    uint32_t ts_base
    uint32_t counter
    aead_state aead
    OpusEncoder* enc             # created on the first frame that must be encoded
    int enc_bitrate
    int enc_complexity
    int enc_fec
    int enc_loss
    int enc_dirty                # settings changed since they were applied
    source_t* sources[16]
    float gain_target
    float gain_current
    int64_t speaking_ok_tick
    int empty_run
    PyObject* encryptor          # fn(bytes) -> bytes; owned reference, changed only with the GIL held
    int encryptor_failing        # inside a failure streak (one event per streak)
    int stop_after_send          # raise EV_SPEAKING_STOP once this tick's (last silence) packet is sent
    # the frame prepared in this tick
    int payload_kind
    Py_ssize_t payload_len
    int64_t payload_tick
    unsigned char payload[1368]
    Py_ssize_t packet_len
    unsigned char packet[1400]
    # counters
    int64_t frames_sent          # packets carrying audio (encoded here or passed through)
    int64_t passthrough_sent     # of those, packets whose payload was a source's Opus packet as given
    int64_t silence_sent         # packets carrying the Opus silence frame
    int64_t underruns            # ticks at which a playing stream had no frame (frame deficit)
    int64_t late                 # packets sent > 5 ms after their deadline
    int64_t skipped              # ticks lost to a resynchronisation while speaking
    int64_t send_errors
    int64_t encode_errors
    int64_t encryptor_errors     # frames dropped because the frame encryptor raised
    int64_t bytes_sent
    int64_t max_late_ns
    int last_errno
    # include_self: a copy of every audio frame sent, as PCM (NULL: off, the common case)
    tap_t* tap
    OpusDecoder* tap_dec         # decodes passed-through packets for the tap


ctypedef struct mthread_t:
    tc_mutex lock                # guards conns/nconns
    conn_t** conns
    int nconns
    int cap
    int running
    int index
    int64_t ticks
    int64_t late_ticks
    int64_t skipped_ticks
    int64_t max_late_ns
    int64_t busy_ns
    int64_t load_ns              # EWMA of the tick's prepare+send time: what placement balances
    int64_t pending_ns           # estimated cost of connections added since the last tick
    int64_t slow_load_ns         # EWMA of the tick time over about 64 ticks: what rebalancing compares
    int64_t incoming_ns          # estimated cost of connections handed over to it, not yet in slow_load_ns
    int64_t idle_skips           # connection-ticks skipped without locking (no sources, quiet)
    int64_t packets              # packets handed to the kernel
    int64_t late_packets         # of those, sent > 5 ms after their deadline
    int64_t late_hist[LATE_BUCKETS]  # packets by lateness (non-cumulative; edges LATE_EDGES_NS)
    int64_t late_sum_ns          # total lateness of all packets
    int64_t hook_holds           # GIL acquisitions by the frame-encryptor pass
    int64_t hook_wait_ns         # time spent waiting to acquire the GIL for that pass
    int64_t hook_held_ns         # time spent holding it (running the encryptors)
    int64_t tick_busy_ns         # busy time of the phases of the current tick
    int64_t ahead_frames         # frames prepared a tick ahead of their deadline (work ahead)
    int added                    # connections ever added: round-robin phase assignment
    int64_t next_rebalance_tick  # when this thread next considers handing connections over
    int64_t moved_in             # connections handed over to this thread by a busier one
    int64_t moved_out            # connections this thread handed over
    int64_t caught_up            # frames of earlier ticks sent late by _catch_up (after a late hand-over)


ctypedef struct event_t:
    int kind
    int64_t conn_id
    int64_t value


ctypedef struct scratch_t:
    # a media thread's working memory for one tick
    int32_t* acc
    int16_t* frame
    int16_t* mixed
    conn_t** snapshot            # this tick's connections, grouped by send phase
    conn_t** sendlist
    conn_t** hooked
    int cap
    int n                        # connections in the snapshot
    int bucket[PHASES + 1]       # phase p's connections are snapshot[bucket[p]:bucket[p + 1]]


cdef inline void source_release(source_t* s) noexcept nogil:
    if tc_atomic_add_int(&s.refcount, -1) == 0:
        tc_mutex_destroy(&s.lock)
        if s.dec != NULL:
            opus_decoder_destroy(s.dec)
        free(s.buf)
        free(s)


cdef inline void ring_read(source_t* s, unsigned char* dst, Py_ssize_t n) noexcept nogil:
    """Take ``n`` bytes (n <= fill) from the ring; lock held by caller."""
    cdef Py_ssize_t first = s.cap - s.rpos
    if first > n:
        first = n
    memcpy(dst, s.buf + s.rpos, first)
    if n > first:
        memcpy(dst + first, s.buf, n - first)
    s.rpos = (s.rpos + n) % s.cap
    s.fill -= n


cdef inline void ring_write(source_t* s, const unsigned char* src, Py_ssize_t n) noexcept nogil:
    """Append ``n`` bytes (n <= cap - fill); lock held by caller."""
    cdef Py_ssize_t wpos = (s.rpos + s.fill) % s.cap
    cdef Py_ssize_t first = s.cap - wpos
    if first > n:
        first = n
    memcpy(s.buf + wpos, src, first)
    if n > first:
        memcpy(s.buf, src + first, n - first)
    s.fill += n


cdef inline Py_ssize_t source_read_frame(source_t* s, int16_t* out) noexcept nogil:
    """Copy one PCM frame (zero-padded at the very end of the input) out of the ring; lock held."""
    cdef Py_ssize_t n = s.fill if s.fill < FRAME_BYTES else FRAME_BYTES
    ring_read(s, <unsigned char*>out, n)
    if n < FRAME_BYTES:
        memset((<unsigned char*>out) + n, 0, FRAME_BYTES - n)
    return n


cdef inline Py_ssize_t source_read_packet(source_t* s, unsigned char* out) noexcept nogil:
    """Take the next Opus packet out of a KIND_OPUS ring; returns its length. Lock held by caller."""
    cdef unsigned char hdr[2]
    cdef Py_ssize_t n
    ring_read(s, hdr, 2)
    n = hdr[0] | (hdr[1] << 8)
    ring_read(s, out, n)
    s.npackets -= 1
    return n


cdef inline void source_clear(source_t* s) noexcept nogil:
    s.fill = 0
    s.rpos = 0
    s.npackets = 0


cdef inline void conn_free(conn_t* c) noexcept nogil:
    """Free a connection (its frame encryptor was already released with the GIL, see close())."""
    cdef int i
    for i in range(c.nsources):
        source_release(c.sources[i])
    c.nsources = 0
    if c.enc != NULL:
        opus_encoder_destroy(c.enc)
    if c.tap_dec != NULL:
        opus_decoder_destroy(c.tap_dec)
    tap_free(c.tap)
    aead_clear(&c.aead)
    tc_mutex_destroy(&c.lock)
    free(c)


cdef inline void tap_free(tap_t* t) noexcept nogil:
    if t != NULL:
        tc_mutex_destroy(&t.lock)
        free(t)


cdef inline void tap_write(tap_t* t, int64_t tick, const int16_t* pcm) noexcept nogil:
    tc_mutex_lock(&t.lock)
    t.ticks[t.head] = tick
    memcpy(&t.pcm[t.head * FRAME_VALUES], pcm, FRAME_BYTES)
    t.head = (t.head + 1) % TAP_FRAMES
    if t.count == TAP_FRAMES:
        t.dropped += 1
    else:
        t.count += 1
    tc_mutex_unlock(&t.lock)


cdef inline void scratch_free(scratch_t* sc) noexcept nogil:
    free(sc.acc); free(sc.frame); free(sc.mixed)
    free(sc.snapshot); free(sc.sendlist); free(sc.hooked)
    memset(sc, 0, sizeof(scratch_t))


cdef inline int scratch_init(scratch_t* sc) noexcept nogil:
    memset(sc, 0, sizeof(scratch_t))
    sc.acc = <int32_t*>malloc(FRAME_VALUES * sizeof(int32_t))
    sc.frame = <int16_t*>malloc(FRAME_BYTES)
    sc.mixed = <int16_t*>malloc(FRAME_BYTES)
    if sc.acc == NULL or sc.frame == NULL or sc.mixed == NULL:
        scratch_free(sc)
        return -1
    return 0


cdef inline int scratch_reserve(scratch_t* sc, int n) noexcept nogil:
    if n <= sc.cap:
        return 0
    free(sc.snapshot); free(sc.sendlist); free(sc.hooked)
    sc.cap = n * 2
    sc.snapshot = <conn_t**>malloc(sc.cap * sizeof(conn_t*))
    sc.sendlist = <conn_t**>malloc(sc.cap * sizeof(conn_t*))
    sc.hooked = <conn_t**>malloc(sc.cap * sizeof(conn_t*))
    if sc.snapshot == NULL or sc.sendlist == NULL or sc.hooked == NULL:
        free(sc.snapshot); free(sc.sendlist); free(sc.hooked)
        sc.snapshot = NULL; sc.sendlist = NULL; sc.hooked = NULL
        sc.cap = 0
        return -1
    return 0


cdef int conns_reserve(mthread_t* t, int extra) noexcept nogil:
    """Room in ``t.conns`` for ``extra`` more connections (``t.lock`` held); -1 when memory runs out."""
    cdef int cap = t.cap
    cdef conn_t** grown
    if t.nconns + extra <= cap:
        return 0
    while cap < t.nconns + extra:
        cap *= 2
    grown = <conn_t**>calloc(cap, sizeof(conn_t*))
    if grown == NULL:
        return -1
    memcpy(grown, t.conns, t.nconns * sizeof(conn_t*))
    free(t.conns)
    t.conns = grown
    t.cap = cap
    return 0


cdef class MediaEngine:
    """The process's scheduler threads. Normally used through :mod:`telecom.engine`, not directly."""

    cdef mthread_t* _threads
    cdef int _nthreads
    cdef int64_t _epoch_ns
    cdef tc_mutex _ev_lock
    cdef event_t* _events
    cdef int _ev_head
    cdef int _ev_len
    cdef readonly int64_t events_dropped
    cdef int _event_fd
    cdef object _pythreads
    cdef bint _started
    cdef readonly int realtime_priority
    cdef readonly bint work_ahead
    cdef readonly bint rebalance
    cdef readonly list realtime_errors

    def __cinit__(self, int threads=1, int realtime_priority=0, bint work_ahead=True, bint rebalance=True):
        if threads < 1 or threads > 64:
            raise ConfigurationError(f"media threads must be 1..64, not {threads}")
        if not 0 <= realtime_priority <= 99:
            raise ConfigurationError(f"realtime_priority must be 0 (off) or 1..99, not {realtime_priority}")
        self.realtime_priority = realtime_priority
        self.work_ahead = work_ahead
        self.rebalance = rebalance
        self.realtime_errors = []
        self._nthreads = threads
        self._threads = <mthread_t*>calloc(threads, sizeof(mthread_t))
        self._events = <event_t*>calloc(EVENT_QUEUE, sizeof(event_t))
        if self._threads == NULL or self._events == NULL:
            raise MemoryError()
        cdef int i
        for i in range(threads):
            tc_mutex_init(&self._threads[i].lock)
            self._threads[i].index = i
            self._threads[i].cap = 64
            self._threads[i].conns = <conn_t**>calloc(64, sizeof(conn_t*))
            if self._threads[i].conns == NULL:
                raise MemoryError()
        tc_mutex_init(&self._ev_lock)
        self._event_fd = tc_eventfd()
        if self._event_fd < 0:
            raise OSError("eventfd() failed")
        self._epoch_ns = tc_now_ns()
        self._pythreads = []

    def __dealloc__(self):
        cdef int i, j
        if self._threads != NULL:
            for i in range(self._nthreads):
                for j in range(self._threads[i].nconns):
                    conn_free(self._threads[i].conns[j])
                free(self._threads[i].conns)
                tc_mutex_destroy(&self._threads[i].lock)
            free(self._threads)
        free(self._events)
        if self._event_fd >= 0:
            close(self._event_fd)

    @property
    def threads(self):
        return self._nthreads

    @property
    def event_fd(self):
        """An eventfd that becomes readable when :meth:`poll_events` has something."""
        return self._event_fd

    def current_tick(self):
        """The number of the tick whose deadline is the latest one not in the future."""
        return (tc_now_ns() - self._epoch_ns) // TICK_NS

    def start(self):
        import threading
        if self._started:
            return
        self._started = True
        cdef int i
        for i in range(self._nthreads):
            self._threads[i].running = 1
            t = threading.Thread(target=self._thread_main, args=(i,), name=f"telecom-media-{i}", daemon=True)
            self._pythreads.append(t)
            t.start()

    def stop(self, timeout=2.0):
        cdef int i
        for i in range(self._nthreads):
            tc_atomic_store_int(&self._threads[i].running, 0)
        for t in self._pythreads:
            t.join(timeout)
        self._pythreads = []
        self._started = False

    def _thread_main(self, int index):
        cdef mthread_t* t = &self._threads[index]
        cdef int rc
        if self.realtime_priority:
            # Opt-in: on a busy host a SCHED_OTHER media thread waits behind other processes for its
            # slice (ms late); SCHED_FIFO preempts them. Without the privilege we say so and go on.
            rc = tc_set_realtime(self.realtime_priority)
            if rc:
                self.realtime_errors.append(rc)
                _log.warning("media thread %d: SCHED_FIFO %d refused (errno %d); running unprioritised",
                             index, self.realtime_priority, rc)
        with nogil:
            self._run(t)

    def run_tick(self, int index=0, tick=None):
        """Run one tick of media thread ``index`` synchronously; returns the time it took (ns).

        For benchmarks and tests of an engine that was not started (``start()`` would race with it).
        ``tick`` defaults to the current tick number.
        """
        if self._started:
            raise TelecomError("run_tick() is for an engine whose threads are not running")
        if not 0 <= index < self._nthreads:
            raise ConfigurationError(f"no media thread {index}")
        cdef int64_t n = self.current_tick() if tick is None else tick
        cdef int64_t t0, t1
        cdef scratch_t sc
        cdef int rc = 0
        with nogil:
            rc = scratch_init(&sc)
            if rc == 0:
                t0 = tc_now_ns()
                self._tick(&self._threads[index], &sc, n, tc_now_ns(), -1)
                t1 = tc_now_ns()
                scratch_free(&sc)
        if rc != 0:
            raise MemoryError()
        return t1 - t0

    cdef void _push_event(self, int kind, int64_t conn_id, int64_t value) noexcept nogil:
        tc_mutex_lock(&self._ev_lock)
        if self._ev_len >= EVENT_QUEUE:
            self.events_dropped += 1
            tc_mutex_unlock(&self._ev_lock)
            return
        cdef int slot = (self._ev_head + self._ev_len) % EVENT_QUEUE
        self._events[slot].kind = kind
        self._events[slot].conn_id = conn_id
        self._events[slot].value = value
        self._ev_len += 1
        tc_mutex_unlock(&self._ev_lock)
        tc_eventfd_signal(self._event_fd)

    def poll_events(self):
        """Drain the event queue: a list of ``(kind, conn_id, value)`` tuples."""
        cdef list out = []
        cdef event_t batch[256]
        cdef int i, n
        tc_eventfd_drain(self._event_fd)
        while True:
            # Copy a batch out without the GIL: a thread holding _ev_lock must never wait for the GIL,
            # or a media thread pushing an event would wait for it too.
            with nogil:
                tc_mutex_lock(&self._ev_lock)
                n = self._ev_len if self._ev_len < 256 else 256
                for i in range(n):
                    batch[i] = self._events[self._ev_head]
                    self._ev_head = (self._ev_head + 1) % EVENT_QUEUE
                self._ev_len -= n
                tc_mutex_unlock(&self._ev_lock)
            for i in range(n):
                out.append((batch[i].kind, batch[i].conn_id, batch[i].value))
            if n < 256:
                break
        return out

    cdef int _add_conn(self, conn_t* c) except -1:
        """Give the connection to the thread with the least measured load.

        Load = the thread's tick-time EWMA + what was added since its last tick + a small weight per
        connection, so that idle connections (which cost almost nothing) still spread evenly.
        """
        cdef int i, best = 0
        cdef int64_t score, best_score = -1
        cdef mthread_t* t
        for i in range(self._nthreads):
            t = &self._threads[i]
            score = (tc_atomic_load64(&t.load_ns) + tc_atomic_load64(&t.pending_ns)
                     + <int64_t>t.nconns * IDLE_WEIGHT_NS)
            if best_score < 0 or score < best_score:
                best = i
                best_score = score
        t = &self._threads[best]
        cdef int ok = 1
        # All of it without the GIL: the media thread takes t.lock every tick, so whoever holds it must
        # never be waiting for the GIL meanwhile.
        with nogil:
            tc_mutex_lock(&t.lock)
            ok = conns_reserve(t, 1) == 0
            if ok:
                c.thread = best
                c.phase = t.added % PHASES
                t.added += 1
                t.conns[t.nconns] = c
                t.nconns += 1
                t.pending_ns += NEW_CONN_NS
            tc_mutex_unlock(&t.lock)
        if not ok:
            raise MemoryError()
        return best

    cdef void _run(self, mthread_t* t) noexcept nogil:
        cdef int64_t tick, deadline, started, late_ns
        cdef int n, phase
        cdef scratch_t sc
        if scratch_init(&sc) != 0:
            self._push_event(EV_SEND_ERROR, -1, 12)  # ENOMEM
            return
        tc_set_timer_slack_1ns()
        tick = (tc_now_ns() - self._epoch_ns) // TICK_NS + 1
        while tc_atomic_load_int(&t.running):
            for phase in range(PHASES):
                deadline = self._epoch_ns + tick * TICK_NS + phase * PHASE_NS
                tc_sleep_until_ns(deadline)
                started = tc_now_ns()
                if phase == 0 and started - deadline > MAX_CATCHUP_TICKS * <int64_t>TICK_NS:
                    # Stalled for over a second (suspended VM, debugger): resynchronise, count the loss.
                    n = <int>((started - deadline) // TICK_NS)
                    t.skipped_ticks += n
                    self._count_skipped(t, n)
                    tick += n
                    deadline = self._epoch_ns + tick * TICK_NS
                self._tick(t, &sc, tick, deadline, phase)
                if self.work_ahead:
                    # Until the next phase is due: this phase's frames of the next tick, for the
                    # connections whose sources already hold them.
                    self._ahead(t, &sc, tick + 1, phase, deadline + PHASE_NS)
                if not tc_atomic_load_int(&t.running):
                    break
            tick += 1
            if self.rebalance and self._nthreads > 1 and tick >= t.next_rebalance_tick:
                # With time to spare before the next tick, a connection handed over joins the other
                # thread's list before that thread snapshots the next tick: seamless (see _shed). A
                # thread that has fallen over LATE_NS behind sheds anyway: the other thread sends the
                # frames it was behind by at once (late), and those connections are on time again.
                late_ns = tc_now_ns() - (self._epoch_ns + tick * TICK_NS)
                if late_ns < -(PHASE_NS // 4) or late_ns > LATE_NS:
                    t.next_rebalance_tick = tick + REBALANCE_TICKS
                    self._shed(t, tick - 1)
        scratch_free(&sc)

    @cython.cdivision(True)
    cdef void _shed(self, mthread_t* t, int64_t tick) noexcept nogil:
        """Hand connections over to the least-loaded media thread when this one carries clearly more.

        Placement (:meth:`_add_conn`) balances measured load when a connection is created, but loads
        change afterwards: connections placed while idle start playing, encoded ones stop. Once a
        second each thread compares its load with the least-loaded other thread's; when it carries
        over ``REBALANCE_MIN_NS`` and ``REBALANCE_MIN_PCT`` % of its own load more, it moves
        connections worth about half the gap. Loads are wall-clock busy times, which a busy host
        inflates at random (2-4x from one tick to the next here), so this compares slow averages
        (``slow_load_ns``, about 64 ticks) that count a hand-over at once, and a moved connection
        stays 10 s: noise must not send connections back and forth. A connection's ``cost_ns``
        counts its prepare time only; the thread's load also holds the sends, so each cost is scaled
        by the thread's load over the sum of its connections' costs. Connections larger than the
        half-gap stay (moving one would only swap the imbalance).

        The hand-over is safe for the stream because it happens at a tick boundary, with time left
        before the next tick (checked by the caller): this thread has sent every frame of the tick
        that ended, and the other thread takes the connection into its snapshot of the next tick, at
        the same phase (the send time does not move). A frame worked ahead travels with it and is
        sent at its tick. Should the other thread still be behind, in an earlier tick, ``_tick`` does
        not send a frame before its tick or twice (``prepared_tick``). A thread that is over
        ``LATE_NS`` behind sheds too (overload is when it matters most): then the other thread takes
        the connections a few ticks on and first sends, late, the frames of the ticks between
        (``handed_tick``, :meth:`_catch_up`); from then on they are on time."""
        cdef int i, k, best = -1, nmove = 0, grown_ok = 1
        cdef int64_t own, score, best_score = 0, gap, want, sum_cost = 0, moved = 0, scaled
        cdef mthread_t* d
        cdef conn_t* c
        cdef conn_t* moving[MAX_MOVES]
        own = tc_atomic_load64(&t.slow_load_ns)
        for i in range(self._nthreads):
            if i == t.index:
                continue
            d = &self._threads[i]
            score = tc_atomic_load64(&d.slow_load_ns) + tc_atomic_load64(&d.incoming_ns)
            if best < 0 or score < best_score:
                best = i
                best_score = score
        gap = own - best_score
        if best < 0 or gap < REBALANCE_MIN_NS or gap * 100 < own * REBALANCE_MIN_PCT:
            return
        d = &self._threads[best]
        want = gap // 2
        tc_mutex_lock(&t.lock)
        for i in range(t.nconns):
            if not tc_atomic_load_int(&t.conns[i].closing):
                sum_cost += t.conns[i].cost_ns
        if sum_cost <= 0:
            tc_mutex_unlock(&t.lock)
            return
        i = 0
        while i < t.nconns and nmove < MAX_MOVES:
            c = t.conns[i]
            scaled = c.cost_ns * own // sum_cost
            if (c.cost_ns >= MOVE_MIN_COST_NS and moved + scaled <= want
                    and (c.moved_tick == 0 or tick - c.moved_tick >= MOVE_COOLDOWN_TICKS)
                    and not tc_atomic_load_int(&c.closing)):
                moving[nmove] = c
                nmove += 1
                moved += scaled
                t.conns[i] = t.conns[t.nconns - 1]     # the one swapped in is looked at next
                t.nconns -= 1
            else:
                i += 1
        if nmove:
            tc_atomic_store64(&t.slow_load_ns, own - moved)
        tc_mutex_unlock(&t.lock)
        if nmove == 0:
            return
        tc_mutex_lock(&d.lock)
        grown_ok = conns_reserve(d, nmove) == 0
        if grown_ok:
            for k in range(nmove):
                tc_atomic_store_int(&moving[k].thread, best)
                moving[k].moved_tick = tick
                moving[k].handed_tick = tick
                d.conns[d.nconns] = moving[k]
                d.nconns += 1
            tc_atomic_add64(&d.incoming_ns, moved)
            d.moved_in += nmove
        tc_mutex_unlock(&d.lock)
        if not grown_ok:
            # Out of memory: they stay here (the list had room for them a moment ago, and only this
            # thread removes from it).
            tc_mutex_lock(&t.lock)
            for k in range(nmove):
                t.conns[t.nconns] = moving[k]
                t.nconns += 1
            tc_atomic_store64(&t.slow_load_ns, own)
            tc_mutex_unlock(&t.lock)
            return
        t.moved_out += nmove

    cdef void _tick(self, mthread_t* t, scratch_t* sc, int64_t tick, int64_t deadline,
                    int phase) noexcept nogil:
        """One phase of a tick (``phase`` -1: the whole tick at once).

        Connections are spread over ``PHASES`` send times (their own schedule: a packet is late when
        it leaves more than 5 ms after *its* deadline), so a thread's sends are not one burst whose
        tail is late. Connections with a frame encryptor (DAVE) are prepared in their own phase too,
        and the phase's encrypted frames go through the encryptor under one GIL hold (so at most
        ``PHASES`` short holds per tick). Preparing them all in phase 0 instead (one hold per tick)
        put the whole thread's encoding in front of phase 0's sends: with DAVE on, 60 encoded streams
        sent a quarter of their frames > 5 ms late. ``phase`` -1 (``run_tick``) still does pass 0.
        """
        cdef int i, n, nsend = 0, nhook = 0, busy, first, last
        cdef int64_t t0, t1, started, late_ns
        cdef conn_t* c
        started = tc_now_ns()
        if phase <= 0:
            if self._snapshot(t, sc) != 0:
                self._push_event(EV_SEND_ERROR, -1, 12)
                return
        n = sc.n
        if phase < 0:
            first = 0
            last = n
        else:
            first = sc.bucket[phase]
            last = sc.bucket[phase + 1]
        t0 = started
        # Pass 0 (whole-tick mode only): every connection with a frame encryptor, under one GIL hold.
        if phase < 0:
            for i in range(n):
                c = sc.snapshot[i]
                if not tc_atomic_load_int(&c.has_encryptor):
                    continue
                busy = tc_atomic_load_int(&c.nsources) != 0 or tc_atomic_load_int(&c.speaking) != SPK_IDLE
                if not busy or c.prepared_tick == tick:
                    continue
                nhook = self._prepare_and_seal(c, tick, sc, nhook)
                t1 = tc_now_ns()
                c.cost_ns += (t1 - t0 - c.cost_ns) >> 3
                t0 = t1
            if nhook:
                self._encrypt_and_seal(t, sc, nhook)
                nhook = 0
                t0 = tc_now_ns()
        # Pass 1: this phase's connections. An idle connection costs two loads.
        for i in range(first, last):
            c = sc.snapshot[i]
            if c.prepared_tick >= tick:
                # Sealed ahead: send it, unless Python closed the connection since (its socket may be
                # closed, and its descriptor number given to another socket, by now). A later tick's
                # frame (only after a hand-over from a thread that was ahead of this one) waits for
                # its tick, and a frame already sent is not sent twice.
                if c.prepared_tick == tick and c.packet_len > 0 and not tc_atomic_load_int(&c.closing):
                    sc.sendlist[nsend] = c
                    nsend += 1
                if c.handed_tick >= 0 and tick > c.handed_tick:
                    c.handed_tick = -1          # handed over with its frames prepared: nothing owed
                continue
            if c.handed_tick >= 0 or c.packet_len > 0:
                # Frames owed for earlier ticks (after a hand-over or a resynchronisation): late, not lost.
                if not tc_atomic_load_int(&c.closing):
                    self._catch_up(t, c, sc, tick, deadline)
                c.handed_tick = -1
            if tc_atomic_load_int(&c.nsources) == 0 and tc_atomic_load_int(&c.speaking) == SPK_IDLE:
                c.cost_ns -= c.cost_ns >> 3
                t.idle_skips += 1
                continue
            nhook = self._prepare_and_seal(c, tick, sc, nhook)   # hooked ones: pass 3
            if c.packet_len > 0:
                sc.sendlist[nsend] = c
                nsend += 1
            t1 = tc_now_ns()
            c.cost_ns += (t1 - t0 - c.cost_ns) >> 3
            t0 = t1
        # Pass 2: send them back to back.
        for i in range(nsend):
            self._send(t, sc.sendlist[i], deadline)
        # Pass 3: this phase's frames that go through the frame encryptor (DAVE).
        if nhook:
            self._run_encryptors(t, sc.hooked, nhook)
            nsend = 0
            for i in range(nhook):
                c = sc.hooked[i]
                if c.payload_len > 0:
                    self._seal(c)
                    if c.packet_len > 0:
                        sc.sendlist[nsend] = c
                        nsend += 1
            for i in range(nsend):
                self._send(t, sc.sendlist[i], deadline)
        t1 = tc_now_ns()
        late_ns = t1 - deadline
        t.busy_ns += t1 - started
        t.tick_busy_ns += t1 - started
        if phase < 0 or phase == PHASES - 1:
            t.ticks += 1
            tc_atomic_store64(&t.load_ns, t.load_ns + ((t.tick_busy_ns - t.load_ns) >> 3))
            # A slower average for rebalancing: wall-clock tick times on a busy host swing by 2-4x
            # from one tick to the next, and moving connections on such noise sends them back and
            # forth. What was handed over since joins it here at once, as an estimate.
            tc_atomic_store64(&t.slow_load_ns, t.slow_load_ns + tc_atomic_take64(&t.incoming_ns)
                              + ((t.tick_busy_ns - t.slow_load_ns) >> 6))
            tc_atomic_store64(&t.pending_ns, 0)
            t.tick_busy_ns = 0
        if late_ns > LATE_NS:
            t.late_ticks += 1
        if late_ns > t.max_late_ns:
            t.max_late_ns = late_ns

    cdef void _ahead(self, mthread_t* t, scratch_t* sc, int64_t tick, int phase,
                     int64_t until) noexcept nogil:
        """Work ahead: prepare (encode, DAVE-encrypt, seal) ``tick``'s frames of ``phase`` one tick early,
        stopping when ``until`` (the next phase's deadline) comes, so that due work always goes first.

        Why: the engine sends a late frame rather than skipping it, so after a stall of X ms a thread at
        load L stays behind for about X / (1 - L) (bench/README.md); at 90 % load a 20 ms stall makes
        about 150 ms of late frames. With the frame already sealed, a late phase costs only its sends
        (about 7 us a frame against 100 us to encode), and the backlog clears at once. Passthrough
        gains less (its send, about 4 us of its 7 us, cannot move earlier) but still clears a backlog
        nearly twice as fast. Only connections whose every playing source already holds the frame are
        worked ahead; the rest are prepared at their deadline as before, so a frame is never sent in
        another tick than it would have been. The price: pause, volume and seek reach the wire one
        frame (20 ms) later."""
        cdef int i, first, last, nhook = 0
        cdef int64_t t0, t1, started
        cdef conn_t* c
        first = sc.bucket[phase]
        last = sc.bucket[phase + 1]
        started = t0 = tc_now_ns()
        for i in range(first, last):
            if t0 >= until:
                break
            c = sc.snapshot[i]
            if c.prepared_tick >= tick or not self._ready_ahead(c, tick):
                continue
            nhook = self._prepare_and_seal(c, tick, sc, nhook)
            t.ahead_frames += 1
            t1 = tc_now_ns()
            c.cost_ns += (t1 - t0 - c.cost_ns) >> 3
            t0 = t1
        if nhook:
            self._encrypt_and_seal(t, sc, nhook)
            t0 = tc_now_ns()
        t.busy_ns += t0 - started
        t.tick_busy_ns += t0 - started

    cdef void _catch_up(self, mthread_t* t, conn_t* c, scratch_t* sc, int64_t tick,
                        int64_t deadline) noexcept nogil:
        """Send what ``c`` owes for the ticks before ``tick``, each frame late and counted against its
        own deadline (a late frame is sent late, not skipped):

        * a frame sealed for an earlier tick and never sent (a hand-over came between, or a
          resynchronisation): sent as it is, rather than overwritten with its audio lost;
        * after a hand-over from a thread that was running behind (``handed_tick``), the frames of
          the ticks between that thread's last one and this one, prepared and sent back to back, as
          the late thread would have. Over ``MAX_CATCHUP_TICKS`` of them, they are skipped and
          counted instead, as after a stall of that length."""
        cdef int64_t base, tt
        cdef conn_t* one[1]
        # Every tick up to the later of these has had its frame (or had none due).
        base = c.handed_tick if c.handed_tick > c.prepared_tick else c.prepared_tick
        if c.packet_len > 0:
            self._send(t, c, deadline - (tick - c.prepared_tick) * <int64_t>TICK_NS)
        if c.handed_tick < 0 or tick - base - 1 <= 0:
            return
        if tick - base - 1 > MAX_CATCHUP_TICKS:
            if tc_atomic_load_int(&c.speaking) == SPK_ACTIVE:
                c.skipped += tick - base - 1
            return
        one[0] = c
        tt = base + 1
        while tt < tick:
            if tc_atomic_load_int(&c.nsources) == 0 and tc_atomic_load_int(&c.speaking) == SPK_IDLE:
                break
            self._prepare(c, tt, sc)
            c.prepared_tick = tt
            if c.payload_len > 0 and c.payload_kind != PL_SILENCE and tc_atomic_load_int(&c.has_encryptor):
                self._run_encryptors(t, one, 1)
            if c.payload_len > 0:
                self._seal(c)
                if c.packet_len > 0:
                    self._send(t, c, deadline - (tick - tt) * <int64_t>TICK_NS)
                    t.caught_up += 1
            tt += 1

    cdef int _prepare_and_seal(self, conn_t* c, int64_t tick, scratch_t* sc, int nhook) noexcept nogil:
        """Prepare ``c``'s frame of ``tick`` and seal it, or, when it goes through the frame encryptor,
        queue it in ``sc.hooked`` (sealed by :meth:`_encrypt_and_seal`). Returns the new queue length."""
        self._prepare(c, tick, sc)
        c.prepared_tick = tick
        if c.payload_len > 0:
            if c.payload_kind != PL_SILENCE and tc_atomic_load_int(&c.has_encryptor):
                sc.hooked[nhook] = c
                return nhook + 1
            self._seal(c)
        return nhook

    cdef void _encrypt_and_seal(self, mthread_t* t, scratch_t* sc, int nhook) noexcept nogil:
        """The queued frames through their encryptors (one GIL hold per slice), then sealed."""
        cdef int i
        self._run_encryptors(t, sc.hooked, nhook)
        for i in range(nhook):
            if sc.hooked[i].payload_len > 0:
                self._seal(sc.hooked[i])

    cdef bint _ready_ahead(self, conn_t* c, int64_t tick) noexcept nogil:
        """Whether ``tick``'s frame of ``c`` can be prepared now: speaking, and every source either
        paused or playing with a whole frame buffered (at least one of them playing)."""
        cdef int i, playing = 0, ok = 1
        cdef source_t* s
        tc_mutex_lock(&c.lock)
        if (not c.configured or c.closing or c.speaking != SPK_ACTIVE or tick < c.speaking_ok_tick
                or c.nsources == 0 or c.stop_after_send):
            tc_mutex_unlock(&c.lock)
            return 0
        for i in range(c.nsources):
            s = c.sources[i]
            tc_mutex_lock(&s.lock)
            if s.state == SRC_PLAYING:
                if (s.kind == KIND_OPUS and s.npackets > 0) or (s.kind != KIND_OPUS and s.fill >= FRAME_BYTES):
                    playing += 1
                else:
                    ok = 0
            elif s.state != SRC_PAUSED:
                ok = 0
            tc_mutex_unlock(&s.lock)
            if not ok:
                break
        tc_mutex_unlock(&c.lock)
        return ok and playing > 0

    cdef int _snapshot(self, mthread_t* t, scratch_t* sc) noexcept nogil:
        """Once per tick: free the connections Python closed, and copy the list, grouped by send phase,
        into ``sc``; connections Python adds meanwhile join at the next tick.

        Once per tick, not per phase: a per-phase scan read every connection's first cache line in
        each of the 8 phases (16 loads per connection per tick, mostly misses at thousands of
        connections) only to skip the 7 phases it does not belong to. Returns -1 (and an empty
        snapshot, so the tick's later phases touch nothing freed) when memory runs out."""
        cdef int i, p, n
        cdef int count[PHASES]
        cdef conn_t* c
        tc_mutex_lock(&t.lock)
        i = 0
        memset(count, 0, sizeof(count))
        while i < t.nconns:
            c = t.conns[i]
            if tc_atomic_load_int(&c.closing):
                self._end_sources_of(c)
                conn_free(c)
                t.conns[i] = t.conns[t.nconns - 1]
                t.nconns -= 1
            else:
                count[c.phase] += 1
                i += 1
        n = t.nconns
        if scratch_reserve(sc, n) != 0:
            tc_mutex_unlock(&t.lock)
            sc.n = 0
            memset(sc.bucket, 0, sizeof(sc.bucket))
            return -1
        sc.bucket[0] = 0
        for p in range(PHASES):
            sc.bucket[p + 1] = sc.bucket[p] + count[p]
            count[p] = sc.bucket[p]          # now: the next free slot of phase p
        for i in range(n):
            c = t.conns[i]
            sc.snapshot[count[c.phase]] = c
            count[c.phase] += 1
        sc.n = n
        tc_mutex_unlock(&t.lock)
        return 0

    cdef void _end_sources_of(self, conn_t* c) noexcept nogil:
        """A closing connection: its stopped (or drained) sources end now, with their event, so that
        ``done`` resolves even though no tick will walk them again (Client.close stops them first)."""
        cdef int i
        cdef source_t* s
        cdef int ended
        for i in range(c.nsources):
            s = c.sources[i]
            tc_mutex_lock(&s.lock)
            ended = s.state == SRC_STOPPED or (s.state != SRC_ENDED and s.input_ended and s.fill == 0)
            if ended:
                s.state = SRC_ENDED
            tc_mutex_unlock(&s.lock)
            if ended:
                self._push_event(EV_SOURCE_ENDED, c.id, s.id)

    cdef void _run_encryptors(self, mthread_t* t, conn_t** hooked, int n) noexcept nogil:
        cdef int start = 0, end
        cdef int64_t t0, t1
        while start < n:
            end = start + HOOK_SLICE
            if end > n:
                end = n
            t0 = tc_now_ns()
            with gil:
                t1 = tc_now_ns()
                self._call_encryptors(hooked, start, end)
            t.hook_wait_ns += t1 - t0
            t.hook_held_ns += tc_now_ns() - t1
            t.hook_holds += 1
            start = end

    cdef void _call_encryptors(self, conn_t** hooked, int start, int end) noexcept:
        """With the GIL: replace each payload by fn(payload); a failure drops the frame."""
        cdef int i
        cdef conn_t* c
        cdef object fn, out
        cdef const unsigned char[::1] view
        cdef Py_ssize_t m
        for i in range(start, end):
            c = hooked[i]
            if c.encryptor == NULL:
                continue          # removed since the prepare pass: send the frame as it is
            fn = <object>c.encryptor
            try:
                out = fn(PyBytes_FromStringAndSize(<char*>c.payload, c.payload_len))
                view = out
                m = view.shape[0]
                if m < 1 or m > MAX_PAYLOAD_BYTES:
                    raise CodecError(f"the frame encryptor returned {m} bytes (1..{MAX_PAYLOAD_BYTES})")
                memcpy(c.payload, &view[0], m)
                c.payload_len = m
                c.encryptor_failing = 0
            except BaseException as exc:
                c.payload_len = 0
                c.encryptor_errors += 1
                if not c.encryptor_failing:
                    c.encryptor_failing = 1
                    _log.error("frame encryptor of connection %d failed; dropping its frames",
                               c.id, exc_info=exc)
                    self._push_event(EV_FRAME_ENCRYPTOR_ERROR, c.id, c.encryptor_errors)

    cdef void _count_skipped(self, mthread_t* t, int n) noexcept nogil:
        cdef int i
        tc_mutex_lock(&t.lock)
        for i in range(t.nconns):
            if t.conns[i].speaking == SPK_ACTIVE:
                t.conns[i].skipped += n
        tc_mutex_unlock(&t.lock)

    cdef void _prepare(self, conn_t* c, int64_t tick, scratch_t* sc) noexcept nogil:
        """Decide this tick's payload for ``c`` (encoded, passed through, silence or nothing)."""
        cdef int i, j, n_playing = 0, n_mixed = 0, pending = 0, n_ready = 0, passthrough = 0, err = 0
        cdef int dec_n, enc_err = 0
        cdef source_t* s
        cdef source_t* ready[16]
        cdef float g0, g1, c0, c1
        cdef Py_ssize_t pkt_len
        cdef int32_t enc_len
        cdef unsigned char pkt[1276]
        cdef int64_t ended_ids[16]
        cdef int n_ended = 0
        cdef int16_t* enc_in = NULL      # the PCM to encode: sc.mixed, or one unity-gain source's frame
        c.packet_len = 0
        c.payload_len = 0
        c.payload_kind = PL_NONE
        tc_mutex_lock(&c.lock)
        if not c.configured or c.closing:
            tc_mutex_unlock(&c.lock)
            return
        c0 = c.gain_current
        c1 = c.gain_target
        c.gain_current = c1
        # Walk the sources; drop the finished ones, note the ones with a frame to give.
        i = 0
        while i < c.nsources:
            s = c.sources[i]
            tc_mutex_lock(&s.lock)
            if s.state == SRC_STOPPED or s.state == SRC_ENDED or (s.input_ended and s.fill == 0):
                s.state = SRC_ENDED
                tc_mutex_unlock(&s.lock)
                ended_ids[n_ended] = s.id
                n_ended += 1
                source_release(s)
                c.sources[i] = c.sources[c.nsources - 1]
                tc_atomic_store_int(&c.nsources, c.nsources - 1)
                continue
            if s.state == SRC_PAUSED:
                tc_mutex_unlock(&s.lock)
                i += 1
                continue
            n_playing += 1
            if s.fill == 0:
                if c.speaking == SPK_ACTIVE:
                    s.underruns += 1
                tc_mutex_unlock(&s.lock)
                i += 1
                continue
            if c.speaking != SPK_ACTIVE or tick < c.speaking_ok_tick:
                pending = 1          # audio is waiting for Speaking: keep it buffered
                tc_mutex_unlock(&s.lock)
                i += 1
                continue
            ready[n_ready] = s
            n_ready += 1
            tc_mutex_unlock(&s.lock)
            i += 1

        # Passthrough: the only source with a frame is Opus and nothing changes its level, so its
        # packet goes out as given (60x cheaper than decode + encode, PERFORMANCE.md). Anything else
        # (a second source, a volume other than 100 %, a ramp in progress) decodes and re-encodes;
        # the decision is per tick, so switching either way loses no frame.
        passthrough = n_ready == 1 and ready[0].kind == KIND_OPUS and c0 == 1.0 and c1 == 1.0
        for j in range(n_ready):
            s = ready[j]
            tc_mutex_lock(&s.lock)
            if s.fill == 0 or s.state != SRC_PLAYING:
                tc_mutex_unlock(&s.lock)     # cleared or paused by Python since the walk
                continue
            g0 = s.gain_current
            g1 = s.gain_target
            s.gain_current = g1
            s.frames_played += 1
            if s.kind == KIND_OPUS:
                if passthrough and g0 == 1.0 and g1 == 1.0:
                    c.payload_len = source_read_packet(s, c.payload)
                    c.payload_kind = PL_PASSTHROUGH
                    s.passthrough_frames += 1
                    tc_mutex_unlock(&s.lock)
                    continue
                pkt_len = source_read_packet(s, pkt)
                # Decoded under the source lock: the decoder state belongs to the source.
                if s.dec == NULL:
                    s.dec = opus_decoder_create(48000, CHANNELS, &err)
                dec_n = -1
                if s.dec != NULL:
                    dec_n = opus_decode(s.dec, pkt, <int32_t>pkt_len, sc.frame, FRAME_SAMPLES, 0)
                s.decoded_frames += 1
                if dec_n != FRAME_SAMPLES:
                    s.decode_errors += 1
                tc_mutex_unlock(&s.lock)
                if dec_n != FRAME_SAMPLES:
                    memset(sc.frame, 0, FRAME_BYTES)    # a bad packet plays as silence, keeps timing
            else:
                source_read_frame(s, sc.frame)
                tc_mutex_unlock(&s.lock)
            if n_ready == 1 and g0 == 1.0 and g1 == 1.0 and c0 == 1.0 and c1 == 1.0:
                enc_in = sc.frame    # one source at unity gain is its own mix: skip accumulate + saturate
                n_mixed = 1
                continue
            if n_mixed == 0:
                mix_clear(sc.acc, FRAME_VALUES)
            mix_accumulate(sc.acc, sc.frame, FRAME_SAMPLES, CHANNELS, g0 * c0, g1 * c1)
            n_mixed += 1

        if c.payload_kind == PL_PASSTHROUGH:
            c.empty_run = 0
        elif n_mixed > 0:
            if enc_in == NULL:
                mix_saturate(sc.mixed, sc.acc, FRAME_VALUES)
                enc_in = sc.mixed
            enc_len = -1
            if c.enc == NULL:
                c.enc = opus_encoder_create(48000, CHANNELS, OPUS_APPLICATION_AUDIO, &enc_err)
                c.enc_dirty = 1
            if c.enc != NULL:
                if c.enc_dirty:
                    tc_opus_set_bitrate(c.enc, c.enc_bitrate)
                    tc_opus_set_complexity(c.enc, c.enc_complexity)
                    tc_opus_set_inband_fec(c.enc, c.enc_fec)
                    # libopus only spends bits on FEC when it expects loss; with FEC off keep it at 0,
                    # which keeps CELT-only encoding at 1/4 of the cost (PERFORMANCE.md).
                    tc_opus_set_packet_loss_perc(c.enc, c.enc_loss if c.enc_fec else 0)
                    c.enc_dirty = 0
                enc_len = opus_encode(c.enc, enc_in, FRAME_SAMPLES, c.payload, MAX_OPUS_BYTES)
            if enc_len < 0:
                c.encode_errors += 1
                tc_mutex_unlock(&c.lock)
                self._push_event(EV_ENCODE_ERROR, c.id, enc_len if c.enc != NULL else enc_err)
                for j in range(n_ended):
                    self._push_event(EV_SOURCE_ENDED, c.id, ended_ids[j])
                return
            c.payload_len = enc_len
            c.payload_kind = PL_ENCODED
            c.empty_run = 0
        elif pending and c.speaking == SPK_ACTIVE:
            pass                 # Speaking confirmed; the first audio frame goes out at speaking_ok_tick
        elif c.speaking == SPK_ACTIVE:
            # Speaking but nothing to send: an underrun (a playing stream without data) or the tail
            # after pause/stop. Silence frames keep the receivers' PLC from interpolating (spec §2.5).
            if n_playing > 0:
                c.underruns += 1
            memcpy(c.payload, SILENCE_FRAME, 3)
            c.payload_len = 3
            c.payload_kind = PL_SILENCE
            c.empty_run += 1
            if c.empty_run >= SILENCE_TAIL:
                tc_atomic_store_int(&c.speaking, SPK_IDLE)
                c.empty_run = 0
                c.stop_after_send = 1    # Speaking 0 must follow the last silence frame on the wire
        elif pending and c.speaking == SPK_IDLE:
            tc_atomic_store_int(&c.speaking, SPK_REQUESTED)
            self._push_event(EV_SPEAKING_START, c.id, 0)
        if c.tap != NULL:
            # include_self: what goes out, as PCM — the mix that was encoded, or the passed-through
            # packet decoded (that costs a decode, only on connections whose muxer asked for it).
            if c.payload_kind == PL_ENCODED:
                tap_write(c.tap, tick, enc_in)
            elif c.payload_kind == PL_PASSTHROUGH:
                if c.tap_dec == NULL:
                    c.tap_dec = opus_decoder_create(48000, CHANNELS, &err)
                if c.tap_dec != NULL and opus_decode(c.tap_dec, c.payload, <int32_t>c.payload_len, sc.frame,
                                                     FRAME_SAMPLES, 0) == FRAME_SAMPLES:
                    tap_write(c.tap, tick, sc.frame)
        c.payload_tick = tick
        tc_mutex_unlock(&c.lock)
        for j in range(n_ended):
            self._push_event(EV_SOURCE_ENDED, c.id, ended_ids[j])

    cdef void _seal(self, conn_t* c) noexcept nogil:
        """RTP header + AEAD seal of the prepared payload into c.packet; counts what is sent."""
        cdef unsigned char header[12]
        cdef Py_ssize_t sealed
        # The timestamp follows the clock, not the packet count: after a quiet gap it jumps by
        # exactly the elapsed time in 960-sample steps.
        rtp_write_header(header, 0x78, 0, c.seq,
                         <uint32_t>(c.ts_base + <uint32_t>(c.payload_tick * FRAME_SAMPLES)), c.ssrc)
        sealed = aead_seal(&c.aead, header, RTP_HEADER_SIZE, c.payload, c.payload_len, c.counter, c.packet)
        if sealed <= 0:
            c.encode_errors += 1
            c.packet_len = 0
            if c.stop_after_send:
                c.stop_after_send = 0
                self._push_event(EV_SPEAKING_STOP, c.id, 0)
            return
        c.packet_len = sealed
        c.seq = <uint16_t>(c.seq + 1)
        c.counter = <uint32_t>(c.counter + 1)
        if c.payload_kind == PL_SILENCE:
            c.silence_sent += 1
        else:
            c.frames_sent += 1
            if c.payload_kind == PL_PASSTHROUGH:
                c.passthrough_sent += 1

    cdef void _send(self, mthread_t* t, conn_t* c, int64_t deadline) noexcept nogil:
        cdef int err
        cdef int64_t late
        err = tc_send_dgram(c.fd, c.packet, c.packet_len)
        late = tc_now_ns() - deadline
        t.packets += 1
        cdef int b = 0
        while b < LATE_BUCKETS - 1 and late > LATE_EDGES_NS[b]:
            b += 1
        t.late_hist[b] += 1
        if late > 0:
            t.late_sum_ns += late
        if err:
            c.send_errors += 1
            if c.last_errno != err:
                c.last_errno = err
                self._push_event(EV_SEND_ERROR, c.id, err)
        else:
            c.bytes_sent += c.packet_len
            c.last_errno = 0
        if late > LATE_NS:
            c.late += 1
            t.late_packets += 1
        if late > c.max_late_ns:
            c.max_late_ns = late
        c.packet_len = 0
        if c.stop_after_send:
            c.stop_after_send = 0
            self._push_event(EV_SPEAKING_STOP, c.id, 0)

    def stats(self):
        """Per-thread scheduler figures (ticks, late ticks and packets, load, busy time)."""
        cdef int i
        cdef mthread_t* t
        out = []
        for i in range(self._nthreads):
            t = &self._threads[i]
            out.append({
                "thread": i,
                "connections": t.nconns,
                "ticks": t.ticks,
                "late_ticks": t.late_ticks,
                "skipped_ticks": t.skipped_ticks,
                "max_late_ms": t.max_late_ns / 1e6,
                "busy_ms": t.busy_ns / 1e6,
                "load_us": t.load_ns / 1e3,
                "packets": t.packets,
                "late_packets": t.late_packets,
                "idle_skips": t.idle_skips,
                "ahead_frames": t.ahead_frames,
                "moved_in": t.moved_in,
                "moved_out": t.moved_out,
                "caught_up_frames": t.caught_up,
                "encryptor_gil_holds": t.hook_holds,
                "encryptor_gil_wait_ms": t.hook_wait_ns / 1e6,
                "encryptor_gil_held_ms": t.hook_held_ns / 1e6,
                # cumulative, Prometheus-style: [[upper edge in s (None: +Inf), packets <= it], ...]
                "send_lateness_buckets": [[LATE_EDGES_NS[j] / 1e9 if j < LATE_BUCKETS - 1 else None,
                                           sum(t.late_hist[k] for k in range(j + 1))]
                                          for j in range(LATE_BUCKETS)],
                "send_lateness_sum_s": t.late_sum_ns / 1e9,
            })
        return {"threads": out, "events_dropped": self.events_dropped}


cdef class PcmSource:
    """A bounded ring of 48 kHz s16le stereo PCM that one or more connections play from."""

    cdef source_t* _s
    cdef readonly int64_t id

    def __cinit__(self, int64_t source_id, Py_ssize_t capacity_bytes, *args):
        if capacity_bytes < FRAME_BYTES:
            raise ConfigurationError(f"a source buffer must hold at least {FRAME_BYTES} bytes")
        self._s = <source_t*>calloc(1, sizeof(source_t))
        if self._s == NULL:
            raise MemoryError()
        self._s.buf = <unsigned char*>malloc(capacity_bytes)
        if self._s.buf == NULL:
            free(self._s)
            self._s = NULL
            raise MemoryError()
        tc_mutex_init(&self._s.lock)
        self._s.kind = KIND_PCM
        self._s.cap = capacity_bytes
        self._s.refcount = 1
        self._s.state = SRC_PLAYING
        self._s.gain_target = 1.0
        self._s.gain_current = 1.0
        self._s.id = source_id
        self.id = source_id

    def __dealloc__(self):
        if self._s != NULL:
            source_release(self._s)
            self._s = NULL

    def write(self, const unsigned char[::1] data not None, bint partial=False):
        """Append PCM; all or nothing unless ``partial``. Returns the number of bytes taken."""
        cdef Py_ssize_t n = data.shape[0], room
        cdef source_t* s = self._s
        if n == 0:
            return 0
        with nogil:
            tc_mutex_lock(&s.lock)
            room = s.cap - s.fill
            if s.input_ended or s.state == SRC_STOPPED or s.state == SRC_ENDED:
                n = -1
            elif n > room:
                if partial:
                    n = room
                else:
                    n = 0
            if n > 0:
                ring_write(s, &data[0], n)
            tc_mutex_unlock(&s.lock)
        if n < 0:
            raise TelecomError("this playable has ended; it takes no more data")
        return n

    def end_input(self):
        """No more data will come: play what is buffered (the last partial frame zero-padded), then end."""
        with nogil:
            tc_mutex_lock(&self._s.lock)
            self._s.input_ended = 1
            tc_mutex_unlock(&self._s.lock)

    cdef void _set_state(self, int state, int only_from) noexcept:
        with nogil:
            tc_mutex_lock(&self._s.lock)
            if only_from == 0 or self._s.state == only_from:
                self._s.state = state
            tc_mutex_unlock(&self._s.lock)

    def pause(self):
        self._set_state(SRC_PAUSED, SRC_PLAYING)

    def resume(self):
        self._set_state(SRC_PLAYING, SRC_PAUSED)

    def stop(self):
        """Stop now; buffered data is discarded."""
        with nogil:
            tc_mutex_lock(&self._s.lock)
            if self._s.state != SRC_ENDED:
                self._s.state = SRC_STOPPED
            source_clear(self._s)
            tc_mutex_unlock(&self._s.lock)

    def clear(self):
        """Drop buffered audio (keeps playing whatever comes next)."""
        with nogil:
            tc_mutex_lock(&self._s.lock)
            source_clear(self._s)
            tc_mutex_unlock(&self._s.lock)

    def set_gain(self, float gain):
        with nogil:
            tc_mutex_lock(&self._s.lock)
            self._s.gain_target = gain
            tc_mutex_unlock(&self._s.lock)

    @property
    def state(self):
        return {SRC_PLAYING: "playing", SRC_PAUSED: "paused", SRC_STOPPED: "stopped",
                SRC_ENDED: "ended"}[self._s.state]

    @property
    def capacity(self):
        return self._s.cap

    @property
    def buffered(self):
        return self._s.fill

    @property
    def frames_played(self):
        return self._s.frames_played

    @property
    def underruns(self):
        return self._s.underruns


cdef class OpusSource(PcmSource):
    """A bounded queue of ready 20 ms Opus packets (48 kHz) that connections send as they are.

    ``push`` takes one packet, all or nothing; ``capacity`` is in packets. The engine sends a packet
    unchanged when its connection plays nothing else and all gains are 100 %; otherwise it decodes
    and re-encodes it (module docstring).
    """

    def __cinit__(self, int64_t source_id, Py_ssize_t capacity_bytes, int max_packets):
        if max_packets < 1:
            raise ConfigurationError("an Opus source must hold at least one packet")
        if capacity_bytes < <Py_ssize_t>max_packets * (MAX_OPUS_BYTES + 2):
            # enough bytes for max_packets of the largest size: the packet count is the only limit
            capacity_bytes = <Py_ssize_t>max_packets * (MAX_OPUS_BYTES + 2)
            free(self._s.buf)
            self._s.buf = <unsigned char*>malloc(capacity_bytes)
            if self._s.buf == NULL:
                raise MemoryError()
            self._s.cap = capacity_bytes
        self._s.kind = KIND_OPUS
        self._s.max_packets = max_packets

    def write(self, data, bint partial=False):
        raise ConfigurationError("an Opus source takes Opus packets (push), not PCM")

    cdef int _check(self, const unsigned char[::1] packet) except -1:
        cdef Py_ssize_t n = packet.shape[0]
        cdef int samples
        if n < 1 or n > MAX_OPUS_BYTES:
            raise CodecError(f"an Opus packet is 1..{MAX_OPUS_BYTES} bytes, not {n}")
        samples = opus_packet_get_nb_samples(&packet[0], <int32_t>n, 48000)
        if samples < 0:
            raise CodecError(f"not a valid Opus packet (libopus error {samples})")
        if samples != FRAME_SAMPLES:
            raise CodecError(f"Opus packets must carry 20 ms (960 samples at 48 kHz); this one carries "
                             f"{samples} samples ({samples / 48:g} ms)")
        return 0

    cdef int _push(self, const unsigned char[::1] packet) except -2:
        """1 taken, 0 full, -1 ended."""
        cdef Py_ssize_t n = packet.shape[0]
        cdef unsigned char hdr[2]
        cdef source_t* s = self._s
        cdef int r
        hdr[0] = n & 0xFF
        hdr[1] = (n >> 8) & 0xFF
        with nogil:
            tc_mutex_lock(&s.lock)
            if s.input_ended or s.state == SRC_STOPPED or s.state == SRC_ENDED:
                r = -1
            elif s.npackets >= s.max_packets or s.cap - s.fill < n + 2:
                r = 0
            else:
                ring_write(s, hdr, 2)
                ring_write(s, &packet[0], n)
                s.npackets += 1
                r = 1
            tc_mutex_unlock(&s.lock)
        return r

    def push(self, const unsigned char[::1] packet not None):
        """Queue one packet. Returns False (and takes nothing) when the queue is full.

        Raises CodecError for anything but one 20 ms Opus packet of 1..1275 bytes.
        """
        self._check(packet)
        cdef int r = self._push(packet)
        if r < 0:
            raise TelecomError("this playable has ended; it takes no more data")
        return r == 1

    def push_many(self, packets):
        """Queue packets in order until one does not fit; returns how many were taken.

        Every packet is validated before any is queued, so a bad one raises and queues nothing.
        """
        cdef list views = [memoryview(p) for p in packets]
        cdef int taken = 0, r
        for v in views:
            self._check(v)
        for v in views:
            r = self._push(v)
            if r < 0:
                if taken == 0:
                    raise TelecomError("this playable has ended; it takes no more data")
                break
            if r == 0:
                break
            taken += 1
        return taken

    @property
    def capacity(self):
        """Packets the queue holds (each 20 ms)."""
        return self._s.max_packets

    @property
    def buffered(self):
        """Packets waiting to be sent."""
        return self._s.npackets

    @property
    def passthrough_frames(self):
        return self._s.passthrough_frames

    @property
    def decoded_frames(self):
        return self._s.decoded_frames

    @property
    def decode_errors(self):
        return self._s.decode_errors


_MODES = {
    "aead_aes256_gcm_rtpsize": MODE_AES256_GCM_RTPSIZE,
    "aead_xchacha20_poly1305_rtpsize": MODE_XCHACHA20_POLY1305_RTPSIZE,
}


cdef class NativeConnection:
    """One voice connection's send state inside the engine. Owned by a media thread once created."""

    cdef conn_t* _c
    cdef MediaEngine _engine
    cdef readonly int64_t id
    cdef int _thread_index

    def __cinit__(self, MediaEngine engine not None, int64_t conn_id, int bitrate=64000,
                  int complexity=10, bint fec=False, int expected_loss=0):
        self._engine = engine
        self.id = conn_id
        self._c = <conn_t*>calloc(1, sizeof(conn_t))
        if self._c == NULL:
            raise MemoryError()
        tc_mutex_init(&self._c.lock)
        self._c.id = conn_id
        self._c.fd = -1
        self._c.gain_target = 1.0
        self._c.gain_current = 1.0
        self._c.prepared_tick = -1
        self._c.handed_tick = -1
        try:
            self._apply_encoder(bitrate, complexity, fec, expected_loss)
        except BaseException:
            tc_mutex_destroy(&self._c.lock)
            free(self._c)
            self._c = NULL
            raise
        self._thread_index = engine._add_conn(self._c)

    @property
    def thread_index(self):
        """The media thread that sends for this connection now (a busier one may hand it over)."""
        if self._c != NULL:
            self._thread_index = tc_atomic_load_int(&self._c.thread)
        return self._thread_index

    def __dealloc__(self):
        if self._c != NULL:
            self._release_encryptor()
            tc_atomic_store_int(&self._c.closing, 1)
            self._c = NULL

    cdef conn_t* _live(self) except NULL:
        if self._c == NULL:
            raise TelecomError("this connection is closed")
        return self._c

    cdef int _apply_encoder(self, int bitrate, int complexity, bint fec, int expected_loss) except -1:
        if not 6000 <= bitrate <= 510000:
            raise ConfigurationError(f"bitrate must be 6000..510000 bit/s, not {bitrate}")
        if not 0 <= complexity <= 10:
            raise ConfigurationError(f"complexity must be 0..10, not {complexity}")
        if not 0 <= expected_loss <= 100:
            raise ConfigurationError(f"expected_loss must be 0..100 %, not {expected_loss}")
        cdef conn_t* c = self._c
        # The encoder itself is created by the media thread on the first frame it must encode: a
        # connection that only ever passes Opus through never pays for one (~30 KiB).
        with nogil:
            tc_mutex_lock(&c.lock)
            c.enc_bitrate = bitrate
            c.enc_complexity = complexity
            c.enc_fec = 1 if fec else 0
            c.enc_loss = expected_loss
            c.enc_dirty = 1
            tc_mutex_unlock(&c.lock)
        return 0

    def set_encoder(self, int bitrate=64000, int complexity=10, bint fec=False, int expected_loss=0):
        self._live()
        self._apply_encoder(bitrate, complexity, fec, expected_loss)

    def configure(self, int fd, uint32_t ssrc, str mode, bytes key not None, uint16_t sequence=0,
                  uint32_t timestamp=0, uint32_t counter=0):
        """Start (or re-key) sending on a connected UDP socket ``fd`` after a Session Description."""
        cdef conn_t* c = self._live()
        if mode not in _MODES:
            raise ConfigurationError(f"unknown transport mode {mode!r}")
        if len(key) != 32:
            raise ConfigurationError("the transport key must be 32 bytes")
        cdef int m = _MODES[mode]
        cdef const unsigned char* k = key
        cdef int rc
        with nogil:
            tc_mutex_lock(&c.lock)
            aead_clear(&c.aead)
            rc = aead_init(&c.aead, m, k)
            if rc == 0:
                c.fd = fd
                c.ssrc = ssrc
                c.seq = sequence
                c.counter = counter
                c.ts_base = timestamp
                tc_atomic_store_int(&c.speaking, SPK_IDLE)
                c.empty_run = 0
                c.configured = 1
                c.prepared_tick = -1     # a frame sealed ahead under the old key/SSRC is not sent
                c.packet_len = 0
            tc_mutex_unlock(&c.lock)
        if rc != 0:
            raise TelecomError(f"could not initialise {mode} ({rc})")

    def unconfigure(self):
        """Stop sending (socket going away); keeps sources and counters."""
        cdef conn_t* c = self._live()
        with nogil:
            tc_mutex_lock(&c.lock)
            c.configured = 0
            tc_atomic_store_int(&c.speaking, SPK_IDLE)
            c.fd = -1
            c.prepared_tick = -1         # nor one sealed ahead for the socket going away
            c.packet_len = 0
            tc_mutex_unlock(&c.lock)

    def attach(self, PcmSource source not None):
        """Play ``source`` (a PcmSource or an OpusSource) on this connection, mixed with the others."""
        cdef conn_t* c = self._live()
        cdef source_t* s = source._s
        cdef int i, ok = 1
        with nogil:
            tc_mutex_lock(&c.lock)
            for i in range(c.nsources):
                if c.sources[i] == s:
                    ok = 2
            if ok == 1 and c.nsources >= MAX_SOURCES:
                ok = 0
            if ok == 1:
                tc_atomic_add_int(&s.refcount, 1)
                c.sources[c.nsources] = s
                tc_atomic_store_int(&c.nsources, c.nsources + 1)
            tc_mutex_unlock(&c.lock)
        if ok == 0:
            raise ConfigurationError(f"at most {MAX_SOURCES} playables can play at once on one client")
        return ok == 1

    def set_gain(self, float gain):
        cdef conn_t* c = self._live()
        with nogil:
            tc_mutex_lock(&c.lock)
            c.gain_target = gain
            tc_mutex_unlock(&c.lock)

    def set_frame_encryptor(self, fn):
        """Pass every non-silence Opus payload through ``fn(payload: bytes) -> bytes`` before RTP + AEAD.

        ``None`` removes it. ``fn`` runs on a media thread holding the GIL, batched with the other
        connections' frames of the same send phase (one GIL hold per up to 64 frames); keep it short
        (DAVE's encryptor takes ~1 µs). If it raises, that frame is dropped, ``encryptor_errors``
        counts it and a ``frame_encryptor_error`` event is raised at the start of each failure run.
        """
        cdef conn_t* c = self._live()
        if fn is not None and not callable(fn):
            raise ConfigurationError("the frame encryptor must be callable (or None)")
        cdef PyObject* old = c.encryptor
        # Swapped with the GIL held: the media thread only reads c.encryptor while holding it too.
        if fn is None:
            tc_atomic_store_int(&c.has_encryptor, 0)
            c.encryptor = NULL
        else:
            Py_XINCREF(<PyObject*>fn)
            c.encryptor = <PyObject*>fn
            c.encryptor_failing = 0
            tc_atomic_store_int(&c.has_encryptor, 1)
        Py_XDECREF(old)

    cdef void _release_encryptor(self) noexcept:
        cdef PyObject* old = self._c.encryptor
        tc_atomic_store_int(&self._c.has_encryptor, 0)
        self._c.encryptor = NULL
        Py_XDECREF(old)

    def confirm_speaking(self):
        """Speaking (op 5) has been written: audio may flow from the next full tick on."""
        cdef conn_t* c = self._live()
        cdef int64_t tick = (tc_now_ns() - self._engine._epoch_ns) // TICK_NS
        with nogil:
            tc_mutex_lock(&c.lock)
            if c.speaking == SPK_REQUESTED:
                tc_atomic_store_int(&c.speaking, SPK_ACTIVE)
                # +2: the next tick may already be due; this guarantees at least one frame of spacing
                c.speaking_ok_tick = tick + 2
                c.empty_run = 0
            tc_mutex_unlock(&c.lock)

    def reset_speaking(self):
        """Forget the Speaking state (after a resume the server expects op 5 again)."""
        cdef conn_t* c = self._live()
        with nogil:
            tc_mutex_lock(&c.lock)
            tc_atomic_store_int(&c.speaking, SPK_IDLE)
            tc_mutex_unlock(&c.lock)

    @property
    def speaking(self):
        return {SPK_IDLE: "idle", SPK_REQUESTED: "requested", SPK_ACTIVE: "active"}[self._live().speaking]

    def stats(self):
        """Send counters: frames_sent (audio packets, passthrough ones included), passthrough_frames,
        silence_frames_sent, underruns (frame deficit), late (> 5 ms after the deadline), skipped,
        errors, and cost_us (EWMA of this connection's prepare time per tick)."""
        cdef conn_t* c = self._live()
        return {
            "frames_sent": c.frames_sent,
            "passthrough_frames": c.passthrough_sent,
            "silence_frames_sent": c.silence_sent,
            "underruns": c.underruns,
            "late": c.late,
            "skipped": c.skipped,
            "send_errors": c.send_errors,
            "encode_errors": c.encode_errors,
            "encryptor_errors": c.encryptor_errors,
            "bytes_sent": c.bytes_sent,
            "max_late_ms": c.max_late_ns / 1e6,
            "cost_us": c.cost_ns / 1e3,
            "sequence": c.seq,
            "sources": c.nsources,
        }

    def set_tap(self, bint on):
        """Copy every audio frame this connection sends, as 48 kHz s16le stereo PCM, into a ring that
        :meth:`tap_read` drains (include_self muxers). Off by default: then it costs one NULL test."""
        cdef conn_t* c = self._live()
        cdef tap_t* t = NULL
        if on:
            t = <tap_t*>calloc(1, sizeof(tap_t))
            if t == NULL:
                raise MemoryError()
            tc_mutex_init(&t.lock)
        with nogil:
            tc_mutex_lock(&c.lock)
            if on and c.tap == NULL:
                c.tap, t = t, NULL
            elif not on:
                c.tap, t = NULL, c.tap
            tc_mutex_unlock(&c.lock)
        tap_free(t)   # the media thread touches c.tap only under c.lock: nothing else holds it

    def tap_read(self):
        """The frames tapped since the last call, oldest first: a list of (send time in ns on
        CLOCK_MONOTONIC — the frame's deadline —, PCM bytes), and how many were overwritten unread."""
        cdef conn_t* c = self._live()
        cdef tap_t* t = c.tap       # freed only by set_tap/close, which need the GIL we hold
        cdef int n, i, first
        cdef int64_t dropped
        cdef int64_t ticks[TAP_FRAMES]
        cdef int16_t* copy
        if t == NULL:
            return [], 0
        copy = <int16_t*>malloc(TAP_FRAMES * FRAME_BYTES)
        if copy == NULL:
            raise MemoryError()
        with nogil:
            tc_mutex_lock(&t.lock)
            n = t.count
            first = (t.head - n + TAP_FRAMES) % TAP_FRAMES
            for i in range(n):
                ticks[i] = t.ticks[(first + i) % TAP_FRAMES]
                memcpy(&copy[i * FRAME_VALUES], &t.pcm[((first + i) % TAP_FRAMES) * FRAME_VALUES], FRAME_BYTES)
            t.count = 0
            dropped = t.dropped
            t.dropped = 0
            tc_mutex_unlock(&t.lock)
        cdef int64_t base = self._engine._epoch_ns + c.phase * <int64_t>PHASE_NS
        try:
            return [(base + ticks[i] * <int64_t>TICK_NS,
                     (<char*>copy)[i * FRAME_BYTES:(i + 1) * FRAME_BYTES]) for i in range(n)], dropped
        finally:
            free(copy)

    def close(self):
        """Hand the connection back to its thread to be freed; later calls raise."""
        if self._c != NULL:
            self._release_encryptor()
            tc_atomic_store_int(&self._c.closing, 1)
            self._c = NULL


def bench_send(int fd, bytes packet not None, int count, bint mmsg=False):
    """Send ``packet`` ``count`` times on connected ``fd`` with send() or sendmmsg(1); ns per call.

    For bench/bench_engine.py: the scheduler's send-path choice is measured, not assumed.
    """
    cdef const unsigned char* p = packet
    cdef size_t n = len(packet)
    cdef int i, err = 0
    cdef int64_t t0, t1
    with nogil:
        t0 = tc_now_ns()
        for i in range(count):
            if mmsg:
                err = tc_send_mmsg1(fd, p, n)
            else:
                err = tc_send_dgram(fd, p, n)
        t1 = tc_now_ns()
    if err:
        raise OSError(err, "send failed")
    return (t1 - t0) / count


EV_KINDS = {
    EV_SPEAKING_START: "speaking_start",
    EV_SPEAKING_STOP: "speaking_stop",
    EV_SOURCE_ENDED: "source_ended",
    EV_SEND_ERROR: "send_error",
    EV_ENCODE_ERROR: "encode_error",
    EV_FRAME_ENCRYPTOR_ERROR: "frame_encryptor_error",
}
TICK_SECONDS = 0.020
