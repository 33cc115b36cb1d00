# cython: language_level=3
"""The native media engine: a few scheduler threads that send audio for every connection of the process.

What it owns: the per-connection send state (SSRC, sequence, timestamp, transport nonce counter,
AEAD key, Opus encoder, volume), the PCM ring buffers of the playables attached to it, and the
threads that tick every 20 ms on absolute deadlines. Each tick a thread walks its connections and
*prepares* every frame (mix with ramped volume -> Opus encode -> RTP header -> AEAD seal), then sends
them all in a second pass. The whole tick runs without the GIL; Python only enqueues changes (attach a
source, change a volume, confirm Speaking) under short per-object mutexes.

What it must not do: any signalling. When a connection is about to start a talk spurt it raises an
``EV_SPEAKING_START`` event and waits for :meth:`NativeConnection.confirm_speaking` (the io thread sends
op 5 first); after the 5-frame silence tail it raises ``EV_SPEAKING_STOP``. Events go through a bounded
queue and an eventfd the io loop watches; when the queue is full, events are counted as dropped.

Timing rules (spec §2.6, PERFORMANCE.md): deadlines are ``epoch + n * 20 ms`` on CLOCK_MONOTONIC, so
the schedule never drifts; the RTP timestamp of a connection is derived from the tick number, so after
a pause it jumps by exactly the elapsed time; a late tick sends its frames late rather than skipping
them (only a stall longer than ``MAX_CATCHUP_TICKS`` resynchronises, and counts the skipped ticks).
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
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
    OpusEncoder,
    opus_encode,
    opus_encoder_create,
    opus_encoder_destroy,
    tc_opus_set_bitrate,
    tc_opus_set_complexity,
    tc_opus_set_inband_fec,
    tc_opus_set_packet_loss_perc,
)
from telecom._fast.mixer cimport mix_accumulate, mix_clear, mix_saturate
from telecom._fast.rtp cimport RTP_HEADER_SIZE, rtp_write_header

from telecom.errors import ConfigurationError, TelecomError


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
    int tc_eventfd()
    void tc_eventfd_signal(int fd)
    void tc_eventfd_drain(int fd)
    int tc_send_dgram(int fd, const unsigned char* buf, size_t length)


cdef extern from "unistd.h" nogil:
    int close(int fd)


cdef enum:
    FRAME_SAMPLES = 960            # per channel, 20 ms at 48 kHz
    CHANNELS = 2
    FRAME_VALUES = 1920            # int16 values in one stereo frame
    FRAME_BYTES = 3840
    MAX_OPUS_BYTES = 1275          # the largest single Opus frame (RFC 6716 §3.2.1)
    MAX_PACKET_BYTES = 1400
    MAX_SOURCES = 16               # playables mixed on one connection
    SILENCE_TAIL = 5               # spec §2.5: five silence frames before going quiet
    EVENT_QUEUE = 4096
    MAX_CATCHUP_TICKS = 50         # behind by more than 1 s: resynchronise instead of bursting
    LATE_NS = 5000000              # a frame sent more than 5 ms after its deadline is "late"
    TICK_NS = 20000000             # 20 ms

# Source states (also exported to Python below).
cdef enum:
    SRC_PLAYING = 1
    SRC_PAUSED = 2
    SRC_STOPPED = 3
    SRC_ENDED = 4

# Speaking state of a connection.
cdef enum:
    SPK_IDLE = 0         # quiet, Speaking cleared
    SPK_REQUESTED = 1    # waiting for the io thread to send op 5
    SPK_ACTIVE = 2       # may send audio from speaking_ok_tick on

# Event kinds.
cdef enum:
    EV_SPEAKING_START = 1
    EV_SPEAKING_STOP = 2
    EV_SOURCE_ENDED = 3
    EV_SEND_ERROR = 4
    EV_ENCODE_ERROR = 5

cdef unsigned char SILENCE_FRAME[3]
SILENCE_FRAME[0] = 0xF8
SILENCE_FRAME[1] = 0xFF
SILENCE_FRAME[2] = 0xFE


ctypedef struct source_t:
    tc_mutex lock
    int64_t id
    int refcount                 # Python wrapper + each attached connection
    unsigned char* buf           # byte ring of s16le stereo PCM
    Py_ssize_t cap
    Py_ssize_t rpos
    Py_ssize_t fill
    int state
    int input_ended              # no more data will come: drain, then end
    float gain_target
    float gain_current
    int64_t frames_played
    int64_t underruns


ctypedef struct conn_t:
    tc_mutex lock
    int64_t id
    int configured               # socket + key present: may send
    int closing                  # the owning thread frees it at its next tick
    int fd
    uint32_t ssrc
    uint16_t seq
    uint32_t ts_base
    uint32_t counter
    aead_state aead
    OpusEncoder* enc
    source_t* sources[16]
    int nsources
    float gain_target
    float gain_current
    int speaking
    int64_t speaking_ok_tick
    int empty_run
    # the frame prepared in this tick
    unsigned char packet[1400]
    Py_ssize_t packet_len
    # counters
    int64_t frames_sent          # packets carrying encoded audio
    int64_t silence_sent         # packets carrying the Opus silence frame
    int64_t underruns            # ticks at which a playing stream had no frame
    int64_t late                 # packets sent > 5 ms after their deadline
    int64_t skipped              # ticks lost to a resynchronisation while speaking
    int64_t send_errors
    int64_t encode_errors
    int64_t bytes_sent
    int64_t max_late_ns
    int last_errno


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


ctypedef struct event_t:
    int kind
    int64_t conn_id
    int64_t value


cdef inline void source_release(source_t* s) noexcept nogil:
    if tc_atomic_add_int(&s.refcount, -1) == 0:
        tc_mutex_destroy(&s.lock)
        free(s.buf)
        free(s)


cdef inline Py_ssize_t source_read_frame(source_t* s, int16_t* out) noexcept nogil:
    """Copy one frame (zero-padded at the very end of the input) out of the ring; lock held by caller."""
    cdef Py_ssize_t n = s.fill if s.fill < FRAME_BYTES else FRAME_BYTES
    cdef Py_ssize_t first = s.cap - s.rpos
    cdef unsigned char* dst = <unsigned char*>out
    if first > n:
        first = n
    memcpy(dst, s.buf + s.rpos, first)
    if n > first:
        memcpy(dst + first, s.buf, n - first)
    if n < FRAME_BYTES:
        memset(dst + n, 0, FRAME_BYTES - n)
    s.rpos = (s.rpos + n) % s.cap
    s.fill -= n
    return n


cdef inline void conn_free(conn_t* c) noexcept nogil:
    cdef int i
    for i in range(c.nsources):
        source_release(c.sources[i])
    c.nsources = 0
    if c.enc != NULL:
        opus_encoder_destroy(c.enc)
    aead_clear(&c.aead)
    tc_mutex_destroy(&c.lock)
    free(c)


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

    def __cinit__(self, int threads=1):
        if threads < 1 or threads > 64:
            raise ConfigurationError(f"media threads must be 1..64, not {threads}")
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
        with nogil:
            self._run(t)

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
        cdef event_t ev
        tc_eventfd_drain(self._event_fd)
        while True:
            with nogil:
                tc_mutex_lock(&self._ev_lock)
            if self._ev_len == 0:
                tc_mutex_unlock(&self._ev_lock)
                break
            ev = self._events[self._ev_head]
            self._ev_head = (self._ev_head + 1) % EVENT_QUEUE
            self._ev_len -= 1
            tc_mutex_unlock(&self._ev_lock)
            out.append((ev.kind, ev.conn_id, ev.value))
        return out

    cdef int _add_conn(self, conn_t* c) except -1:
        """Give the connection to the thread with the fewest connections."""
        cdef int i, best = 0
        for i in range(1, self._nthreads):
            if self._threads[i].nconns < self._threads[best].nconns:
                best = i
        cdef mthread_t* t = &self._threads[best]
        cdef conn_t** grown
        with nogil:
            tc_mutex_lock(&t.lock)
        if t.nconns == t.cap:
            grown = <conn_t**>calloc(t.cap * 2, sizeof(conn_t*))
            if grown == NULL:
                tc_mutex_unlock(&t.lock)
                raise MemoryError()
            memcpy(grown, t.conns, t.nconns * sizeof(conn_t*))
            free(t.conns)
            t.conns = grown
            t.cap *= 2
        t.conns[t.nconns] = c
        t.nconns += 1
        tc_mutex_unlock(&t.lock)
        return best

    cdef void _run(self, mthread_t* t) noexcept nogil:
        cdef int64_t tick, deadline, now, late_ns, started
        cdef int i, n, cap = 0
        cdef conn_t** snapshot = NULL
        cdef int32_t* acc = <int32_t*>malloc(FRAME_VALUES * sizeof(int32_t))
        cdef int16_t* frame = <int16_t*>malloc(FRAME_BYTES)
        cdef int16_t* mixed = <int16_t*>malloc(FRAME_BYTES)
        cdef unsigned char* opus_buf = <unsigned char*>malloc(MAX_OPUS_BYTES)
        if acc == NULL or frame == NULL or mixed == NULL or opus_buf == NULL:
            self._push_event(EV_SEND_ERROR, -1, 12)  # ENOMEM
            free(acc); free(frame); free(mixed); free(opus_buf)
            return
        tc_set_timer_slack_1ns()
        now = tc_now_ns()
        tick = (now - self._epoch_ns) // TICK_NS + 1
        while tc_atomic_load_int(&t.running):
            deadline = self._epoch_ns + tick * TICK_NS
            tc_sleep_until_ns(deadline)
            started = tc_now_ns()
            if started - deadline > MAX_CATCHUP_TICKS * <int64_t>TICK_NS:
                # Stalled for over a second (suspended VM, debugger): resynchronise, count what we lost.
                n = <int>((started - deadline) // TICK_NS)
                t.skipped_ticks += n
                self._count_skipped(t, n)
                tick += n
                deadline = self._epoch_ns + tick * TICK_NS
            # Apply removals and take a snapshot of the connection list; Python may add meanwhile.
            tc_mutex_lock(&t.lock)
            i = 0
            while i < t.nconns:
                if tc_atomic_load_int(&t.conns[i].closing):
                    conn_free(t.conns[i])
                    t.conns[i] = t.conns[t.nconns - 1]
                    t.nconns -= 1
                else:
                    i += 1
            n = t.nconns
            if n > cap:
                free(snapshot)
                cap = n * 2
                snapshot = <conn_t**>malloc(cap * sizeof(conn_t*))
            if n:
                memcpy(snapshot, t.conns, n * sizeof(conn_t*))
            tc_mutex_unlock(&t.lock)
            # Pass 1: prepare every frame.
            for i in range(n):
                self._prepare(snapshot[i], tick, acc, frame, mixed, opus_buf)
            # Pass 2: send them.
            for i in range(n):
                self._send(snapshot[i], deadline)
            now = tc_now_ns()
            late_ns = now - deadline
            t.ticks += 1
            t.busy_ns += now - started
            if late_ns > LATE_NS:
                t.late_ticks += 1
            if late_ns > t.max_late_ns:
                t.max_late_ns = late_ns
            tick += 1
        free(snapshot); free(acc); free(frame); free(mixed); free(opus_buf)

    cdef void _count_skipped(self, mthread_t* t, int n) noexcept nogil:
        cdef int i
        tc_mutex_lock(&t.lock)
        for i in range(t.nconns):
            if t.conns[i].speaking == SPK_ACTIVE:
                t.conns[i].skipped += n
        tc_mutex_unlock(&t.lock)

    cdef void _prepare(self, conn_t* c, int64_t tick, int32_t* acc, int16_t* frame, int16_t* mixed,
                       unsigned char* opus_buf) noexcept nogil:
        cdef int i, j, n_playing = 0, n_mixed = 0, pending = 0
        cdef source_t* s
        cdef float g0, g1, c0, c1
        cdef const unsigned char* payload = NULL
        cdef Py_ssize_t payload_len = 0, sealed
        cdef int32_t enc_len
        cdef unsigned char header[12]
        cdef int64_t ended_ids[16]
        cdef int n_ended = 0
        c.packet_len = 0
        tc_mutex_lock(&c.lock)
        if not c.configured or c.closing:
            tc_mutex_unlock(&c.lock)
            return
        c0 = c.gain_current
        c1 = c.gain_target
        c.gain_current = c1
        # Walk the sources; drop the finished ones.
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
                c.nsources -= 1
                c.sources[i] = c.sources[c.nsources]
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
            source_read_frame(s, frame)
            s.frames_played += 1
            g0 = s.gain_current
            g1 = s.gain_target
            s.gain_current = g1
            tc_mutex_unlock(&s.lock)
            if n_mixed == 0:
                mix_clear(acc, FRAME_VALUES)
            mix_accumulate(acc, frame, FRAME_SAMPLES, CHANNELS, g0 * c0, g1 * c1)
            n_mixed += 1
            i += 1

        if n_mixed > 0:
            mix_saturate(mixed, acc, FRAME_VALUES)
            enc_len = opus_encode(c.enc, mixed, FRAME_SAMPLES, opus_buf, MAX_OPUS_BYTES)
            if enc_len < 0:
                c.encode_errors += 1
                tc_mutex_unlock(&c.lock)
                self._push_event(EV_ENCODE_ERROR, c.id, enc_len)
                for j in range(n_ended):
                    self._push_event(EV_SOURCE_ENDED, c.id, ended_ids[j])
                return
            payload = opus_buf
            payload_len = enc_len
            c.empty_run = 0
            c.frames_sent += 1
        elif pending and c.speaking == SPK_ACTIVE:
            pass                 # Speaking confirmed; the first audio frame goes out at speaking_ok_tick
        elif c.speaking == SPK_ACTIVE:
            # Speaking but nothing to send: an underrun (a playing stream without data) or the tail
            # after pause/stop. Silence frames keep the receivers' PLC from interpolating (spec §2.5).
            if n_playing > 0:
                c.underruns += 1
            payload = SILENCE_FRAME
            payload_len = 3
            c.silence_sent += 1
            c.empty_run += 1
            if c.empty_run >= SILENCE_TAIL:
                c.speaking = SPK_IDLE
                c.empty_run = 0
                self._push_event(EV_SPEAKING_STOP, c.id, 0)
        elif pending and c.speaking == SPK_IDLE:
            c.speaking = SPK_REQUESTED
            self._push_event(EV_SPEAKING_START, c.id, 0)

        if payload_len > 0:
            # The timestamp follows the clock, not the packet count: after a quiet gap it jumps by
            # exactly the elapsed time in 960-sample steps.
            rtp_write_header(header, 0x78, 0, c.seq, <uint32_t>(c.ts_base + <uint32_t>(tick * FRAME_SAMPLES)), c.ssrc)
            sealed = aead_seal(&c.aead, header, RTP_HEADER_SIZE, payload, payload_len, c.counter, c.packet)
            if sealed > 0:
                c.packet_len = sealed
                c.seq = <uint16_t>(c.seq + 1)
                c.counter = <uint32_t>(c.counter + 1)
            else:
                c.encode_errors += 1
        tc_mutex_unlock(&c.lock)
        for j in range(n_ended):
            self._push_event(EV_SOURCE_ENDED, c.id, ended_ids[j])

    cdef void _send(self, conn_t* c, int64_t deadline) noexcept nogil:
        cdef int err
        cdef int64_t late
        if c.packet_len <= 0:
            return
        err = tc_send_dgram(c.fd, c.packet, c.packet_len)
        late = tc_now_ns() - deadline
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
        if late > c.max_late_ns:
            c.max_late_ns = late
        c.packet_len = 0

    def stats(self):
        """Per-thread scheduler figures (ticks, late ticks, worst lateness, busy time)."""
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
            })
        return {"threads": out, "events_dropped": self.events_dropped}


cdef class PcmSource:
    """A bounded ring of 48 kHz s16le stereo PCM that one or more connections play from."""

    cdef source_t* _s
    cdef readonly int64_t id

    def __cinit__(self, int64_t source_id, Py_ssize_t capacity_bytes):
        if capacity_bytes < FRAME_BYTES:
            raise ConfigurationError(f"a PCM buffer must hold at least one frame ({FRAME_BYTES} bytes)")
        self._s = <source_t*>calloc(1, sizeof(source_t))
        if self._s == NULL:
            raise MemoryError()
        self._s.buf = <unsigned char*>malloc(capacity_bytes)
        if self._s.buf == NULL:
            free(self._s)
            self._s = NULL
            raise MemoryError()
        tc_mutex_init(&self._s.lock)
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
        cdef Py_ssize_t n = data.shape[0], room, wpos, first
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
                wpos = (s.rpos + s.fill) % s.cap
                first = s.cap - wpos
                if first > n:
                    first = n
                memcpy(s.buf + wpos, &data[0], first)
                if n > first:
                    memcpy(s.buf, &data[first], n - first)
                s.fill += n
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
            self._s.fill = 0
            tc_mutex_unlock(&self._s.lock)

    def clear(self):
        """Drop buffered audio (keeps playing whatever comes next)."""
        with nogil:
            tc_mutex_lock(&self._s.lock)
            self._s.fill = 0
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


_MODES = {
    "aead_aes256_gcm_rtpsize": MODE_AES256_GCM_RTPSIZE,
    "aead_xchacha20_poly1305_rtpsize": MODE_XCHACHA20_POLY1305_RTPSIZE,
}


cdef class NativeConnection:
    """One voice connection's send state inside the engine. Owned by a media thread once created."""

    cdef conn_t* _c
    cdef MediaEngine _engine
    cdef readonly int64_t id
    cdef readonly int thread_index

    def __cinit__(self, MediaEngine engine not None, int64_t conn_id, int bitrate=64000,
                  int complexity=10, bint fec=False, int expected_loss=0):
        cdef int err = 0
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
        self._c.enc = opus_encoder_create(48000, CHANNELS, OPUS_APPLICATION_AUDIO, &err)
        if self._c.enc == NULL or err != 0:
            tc_mutex_destroy(&self._c.lock)
            free(self._c)
            self._c = NULL
            raise TelecomError(f"opus_encoder_create failed ({err})")
        self._apply_encoder(bitrate, complexity, fec, expected_loss)
        self.thread_index = engine._add_conn(self._c)

    def __dealloc__(self):
        if self._c != NULL:
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
        with nogil:
            tc_mutex_lock(&c.lock)
            tc_opus_set_bitrate(c.enc, bitrate)
            tc_opus_set_complexity(c.enc, complexity)
            tc_opus_set_inband_fec(c.enc, 1 if fec else 0)
            # libopus only spends bits on FEC when it expects loss; with FEC off keep it at 0, which
            # keeps CELT-only encoding at 1/4 of the cost (PERFORMANCE.md).
            tc_opus_set_packet_loss_perc(c.enc, expected_loss if fec else 0)
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
                c.speaking = SPK_IDLE
                c.empty_run = 0
                c.configured = 1
            tc_mutex_unlock(&c.lock)
        if rc != 0:
            raise TelecomError(f"could not initialise {mode} ({rc})")

    def unconfigure(self):
        """Stop sending (socket going away); keeps sources and counters."""
        cdef conn_t* c = self._live()
        with nogil:
            tc_mutex_lock(&c.lock)
            c.configured = 0
            c.speaking = SPK_IDLE
            c.fd = -1
            tc_mutex_unlock(&c.lock)

    def attach(self, PcmSource source not None):
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
                c.nsources += 1
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

    def confirm_speaking(self):
        """Speaking (op 5) has been written: audio may flow from the next full tick on."""
        cdef conn_t* c = self._live()
        cdef int64_t tick = (tc_now_ns() - self._engine._epoch_ns) // TICK_NS
        with nogil:
            tc_mutex_lock(&c.lock)
            if c.speaking == SPK_REQUESTED:
                c.speaking = SPK_ACTIVE
                # +2: the next tick may already be due; this guarantees at least one frame of spacing
                c.speaking_ok_tick = tick + 2
                c.empty_run = 0
            tc_mutex_unlock(&c.lock)

    def reset_speaking(self):
        """Forget the Speaking state (after a resume the server expects op 5 again)."""
        cdef conn_t* c = self._live()
        with nogil:
            tc_mutex_lock(&c.lock)
            c.speaking = SPK_IDLE
            tc_mutex_unlock(&c.lock)

    @property
    def speaking(self):
        return {SPK_IDLE: "idle", SPK_REQUESTED: "requested", SPK_ACTIVE: "active"}[self._live().speaking]

    def stats(self):
        cdef conn_t* c = self._live()
        return {
            "frames_sent": c.frames_sent,
            "silence_frames_sent": c.silence_sent,
            "underruns": c.underruns,
            "late": c.late,
            "skipped": c.skipped,
            "send_errors": c.send_errors,
            "encode_errors": c.encode_errors,
            "bytes_sent": c.bytes_sent,
            "max_late_ms": c.max_late_ns / 1e6,
            "sequence": c.seq,
            "sources": c.nsources,
        }

    def close(self):
        """Hand the connection back to its thread to be freed; later calls raise."""
        if self._c != NULL:
            tc_atomic_store_int(&self._c.closing, 1)
            self._c = NULL


EV_KINDS = {
    EV_SPEAKING_START: "speaking_start",
    EV_SPEAKING_STOP: "speaking_stop",
    EV_SOURCE_ENDED: "source_ended",
    EV_SEND_ERROR: "send_error",
    EV_ENCODE_ERROR: "encode_error",
}
TICK_SECONDS = 0.020
