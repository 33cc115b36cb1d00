# cython: language_level=3
"""The native receive core: every voice connection's incoming audio, from UDP to 20 ms PCM frames.

What it owns (one :class:`ReceiveCore` per process, one thread): ``epoll`` over every connection's
socket plus a 20 ms ``timerfd``; ``recvmmsg`` in batches of 64; RTP/RTCP classification (RTCP and
non-audio are counted and dropped, spec §2.7); AEAD open with the rtpsize rule (extension body skipped,
padding stripped, spec §2.4); SSRC -> user from op 5 (packets of an SSRC not mapped yet are held up to
1 s / 64 packets, not dropped); the DAVE frame-decryptor hook, called with the GIL taken once per
receive round for all of that round's frames; per SSRC a jitter buffer (:mod:`telecom._fast.jitter`)
and an Opus decoder with PLC and in-band FEC; the muxers' accumulation rings (wall-clock timeline);
and a bounded queue of per-tick batches (frames, mixed muxer blocks, speaking start/stop) that one
Python output worker drains, taking the GIL once per batch.

Why one thread per process: receiving costs ~30 us per speaker-frame (decode dominates), so one core
serves 400+ speakers; a single loop keeps every jitter buffer and decoder single-threaded (no locks in
the hot path) and one timerfd drives every playout clock. It only reads the sockets: the send engine
writes on the same fds from its own threads and never waits for this one.

What it must not do: call Python per packet or per frame, block on anything but epoll, or touch the
send state. Background failures (a decryptor raising) are queued and surface as events.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int16_t, int32_t, int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memmove, memset

from telecom._fast.aead cimport (
    MODE_AES256_GCM_RTPSIZE,
    MODE_XCHACHA20_POLY1305_RTPSIZE,
    aead_clear,
    aead_init,
    aead_open,
)
from telecom._fast.includes.opus cimport (
    OPUS_OK,
    opus_decode,
    opus_decoder_create,
    opus_decoder_destroy,
    opus_int16,
    opus_int32,
    opus_packet_get_nb_channels,
    opus_packet_get_samples_per_frame,
)
from telecom._fast.jitter cimport (
    JB_END,
    JB_FRAME,
    JB_LOST,
    JB_NONE,
    jb_init,
    jb_out,
    jb_pop,
    jb_push,
)
from telecom._fast.mixer cimport mix_accumulate, mix_clear, mix_saturate
from telecom._fast.rtp cimport PACKET_RTCP, PACKET_RTP, rtp_classify

from telecom.errors import ConfigurationError, TelecomError


cdef extern from "engine_support.h" nogil:
    int tc_mutex_init(tc_mutex* m)
    void tc_mutex_destroy(tc_mutex* m)
    void tc_mutex_lock(tc_mutex* m)
    void tc_mutex_unlock(tc_mutex* m)
    int64_t tc_now_ns()
    int tc_eventfd()
    void tc_eventfd_signal(int fd)
    void tc_eventfd_drain(int fd)


cdef extern from "receive_support.h" nogil:
    int TC_RX_BATCH
    void tc_rx_batch_init(tc_rx_batch* b)
    int tc_rx_recv(int fd, tc_rx_batch* b)
    unsigned char* tc_rx_data(tc_rx_batch* b, int i)
    int tc_rx_len(tc_rx_batch* b, int i)
    int tc_enable_rx_timestamps(int fd)
    int64_t tc_rx_stamp_ns(tc_rx_batch* b, int i)
    int64_t tc_realtime_offset_ns()
    int tc_epoll_create()
    int tc_epoll_add(int ep, int fd, uint64_t tag)
    int tc_epoll_del(int ep, int fd)
    int tc_epoll_wait(int ep, uint64_t* tags, int maxn, int timeout_ms)
    int tc_timerfd_periodic(int64_t period_ns)
    uint64_t tc_timerfd_read(int fd)
    int tc_cond_init(tc_cond* c)
    void tc_cond_destroy(tc_cond* c)
    void tc_cond_signal(tc_cond* c)
    void tc_cond_broadcast(tc_cond* c)
    void tc_cond_wait_until(tc_cond* c, tc_mutex* m, int64_t deadline_ns)


cdef extern from "unistd.h" nogil:
    int close(int fd)


cdef extern from "opus.h" nogil:
    int opus_packet_parse(const unsigned char* data, opus_int32 len, unsigned char* out_toc,
                          const unsigned char* frames[48], opus_int16 size[48], int* payload_offset)


cdef enum:
    TICK_NS = 20000000
    FRAME = 960
    WORK_MAX = 1024              # DAVE frames decrypted per GIL hold, at most
    TAG_TIMER = 0xFFFFFFFFFFFF0001
    TAG_WAKE = 0xFFFFFFFFFFFF0002
    MAX_CATCHUP = 5              # ticks run back to back after a stall, at most

_MODES = {"aead_aes256_gcm_rtpsize": MODE_AES256_GCM_RTPSIZE,
          "aead_xchacha20_poly1305_rtpsize": MODE_XCHACHA20_POLY1305_RTPSIZE}

REC_KINDS = {REC_FRAME: "frame", REC_MUX: "mux", REC_SPEAKING_START: "speaking_start",
             REC_SPEAKING_STOP: "speaking_stop"}
FLAG_CONCEALED = RF_CONCEALED
FLAG_FEC = RF_FEC
FLAG_SPURT_START = RF_SPURT_START
MUX_DELAY_DEFAULT_NS = 200000000


ctypedef struct work_t:
    rconn_t* conn
    uint32_t ssrc
    int64_t user_id
    uint16_t seq
    uint32_t ts
    int64_t arrival_ns
    int len
    unsigned char data[JB_SLOT_BYTES]


cdef inline uint16_t _load16(const unsigned char* p) noexcept nogil:
    return <uint16_t>((<uint16_t>p[0] << 8) | p[1])


cdef inline uint32_t _load32(const unsigned char* p) noexcept nogil:
    return ((<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3])


cdef inline bint _is_silence(const unsigned char* p, int n) noexcept nogil:
    return n == 3 and p[0] == 0xF8 and p[1] == 0xFF and p[2] == 0xFE


cdef bint _has_fec(const unsigned char* p, int n) noexcept nogil:
    """Whether an Opus packet carries in-band FEC (SILK LBRR) for the frame before it.

    Only SILK-only and hybrid packets (TOC config < 16) can. The SILK header flags are the first
    range-coded symbols, each equiprobable, so they are the top bits of the first frame's first byte
    (RFC 6716 §4.2.3-4.2.4): one VAD bit per 20 ms SILK frame, then the LBRR bit, per channel (mid,
    then side). libopus 1.3 has no query for it; without LBRR, a FEC decode is just PLC.
    """
    cdef const unsigned char* frames[48]
    cdef opus_int16 sizes[48]
    cdef int silk_frames = 1, samples
    cdef bint lbrr
    if n < 2 or (p[0] >> 3) >= 16:
        return False
    samples = opus_packet_get_samples_per_frame(p, 48000)
    if samples > 960:
        silk_frames = samples // 960
    if opus_packet_parse(p, n, NULL, frames, sizes, NULL) <= 0 or sizes[0] == 0:
        return False
    lbrr = (frames[0][0] >> (7 - silk_frames)) & 1
    if opus_packet_get_nb_channels(p) == 2:
        lbrr = lbrr or ((frames[0][0] >> (6 - 2 * silk_frames)) & 1)
    return lbrr


@cython.cdivision(True)
cdef inline int64_t _samples_to_ns(int64_t s) noexcept nogil:
    return (s * 62500) // 3


@cython.cdivision(True)
cdef inline int64_t _ns_to_samples(int64_t ns) noexcept nogil:
    # floor, also for negative values (a frame placed before the muxer's origin)
    if ns >= 0:
        return (ns * 3) // 62500
    return -((-ns * 3 + 62499) // 62500)


cdef void _stream_free(stream_t* st) noexcept nogil:
    if st != NULL:
        if st.dec != NULL:
            opus_decoder_destroy(st.dec)
        free(st)


cdef void _conn_free(rconn_t* c) noexcept nogil:
    cdef int i
    if c == NULL:
        return
    for i in range(c.nstreams):
        _stream_free(c.streams[i])
    free(c.streams)
    free(c.map)
    free(c.pending)
    aead_clear(&c.aead)
    free(c)


cdef void _batch_free(batch_t* b) noexcept nogil:
    if b != NULL:
        free(b.recs)
        free(b.pcm)
        free(b)


@cython.cdivision(True)
cdef void _mux_add(mux_t* m, int64_t time_ns, const int16_t* pcm, int n) noexcept nogil:
    """Accumulate n stereo samples placed at time_ns (arrival clock) into the muxer's ring."""
    cdef int64_t pos = _ns_to_samples(time_ns - m.origin_ns)
    cdef int64_t start = pos, end = pos + n, limit, idx, cnt
    m.frames_in += 1
    if end <= m.emitted:
        m.late_samples += n
        return
    if start < m.emitted:
        m.late_samples += m.emitted - start
        start = m.emitted
    limit = m.emitted + MUX_RING
    if end > limit:
        end = limit
    while start < end:
        idx = start % MUX_RING
        cnt = end - start
        if cnt > MUX_RING - idx:
            cnt = MUX_RING - idx
        mix_accumulate(m.acc + 2 * idx, pcm + 2 * (start - pos), cnt, 2, 1.0, 1.0)
        start += cnt


cdef class ReceiveCore:
    """The process's native receive core. Python drives it through these methods (thread-safe)."""

    cdef tc_mutex _lock
    cdef tc_cond _cond
    cdef rconn_t** _conns
    cdef int _nconns
    cdef int _capconns
    cdef mux_t** _muxes
    cdef int _nmuxes
    cdef int _capmuxes
    cdef batch_t* _cur
    cdef batch_t* _queue[RX_QUEUE]
    cdef int _qhead
    cdef int _qlen
    cdef int _epfd
    cdef int _tfd
    cdef int _wakefd
    cdef bint _stop
    cdef bint _running
    cdef tc_rx_batch* _rx
    cdef unsigned char* _open_buf
    cdef int16_t* _pcm
    cdef work_t* _work
    cdef int _nwork
    cdef object _decryptors
    cdef object _errors
    cdef object _thread
    cdef readonly int64_t ticks
    cdef readonly int64_t ticks_skipped
    cdef readonly int64_t batches_dropped
    cdef readonly int64_t records_dropped
    cdef readonly int64_t busy_ns

    def __cinit__(self):
        self._epfd = self._tfd = self._wakefd = -1
        tc_mutex_init(&self._lock)
        tc_cond_init(&self._cond)
        self._rx = <tc_rx_batch*>malloc(sizeof(tc_rx_batch))
        self._open_buf = <unsigned char*>malloc(4096)
        self._pcm = <int16_t*>malloc(RX_FRAME_MAX * 2 * sizeof(int16_t))
        self._work = <work_t*>malloc(WORK_MAX * sizeof(work_t))
        self._cur = <batch_t*>calloc(1, sizeof(batch_t))
        if self._rx == NULL or self._open_buf == NULL or self._pcm == NULL or self._work == NULL \
                or self._cur == NULL:
            raise MemoryError()
        tc_rx_batch_init(self._rx)
        self._epfd = tc_epoll_create()
        self._wakefd = tc_eventfd()
        if self._epfd < 0 or self._wakefd < 0:
            raise OSError("could not create the receive core's epoll/eventfd")
        tc_epoll_add(self._epfd, self._wakefd, TAG_WAKE)
        self._decryptors = {}
        self._errors = []

    def __dealloc__(self):
        cdef int i
        for i in range(self._nconns):
            _conn_free(self._conns[i])
        free(self._conns)
        for i in range(self._nmuxes):
            free(self._muxes[i].acc)
            free(self._muxes[i])
        free(self._muxes)
        for i in range(self._qlen):
            _batch_free(self._queue[(self._qhead + i) % RX_QUEUE])
        _batch_free(self._cur)
        free(self._rx)
        free(self._open_buf)
        free(self._pcm)
        free(self._work)
        for fd in (self._epfd, self._tfd, self._wakefd):
            if fd >= 0:
                close(fd)
        tc_cond_destroy(&self._cond)
        tc_mutex_destroy(&self._lock)

    # -- lookups (lock held) -------------------------------------------------------------------------
    cdef rconn_t* _conn(self, int64_t conn_id) noexcept nogil:
        cdef int i
        for i in range(self._nconns):
            if self._conns[i].id == conn_id:
                return self._conns[i]
        return NULL

    cdef mux_t* _mux(self, int64_t mux_id) noexcept nogil:
        cdef int i
        for i in range(self._nmuxes):
            if self._muxes[i].id == mux_id:
                return self._muxes[i]
        return NULL

    cdef int64_t _user_of(self, rconn_t* c, uint32_t ssrc) noexcept nogil:
        cdef int i
        for i in range(c.nmap):
            if c.map[i].ssrc == ssrc:
                return c.map[i].user_id
        return 0

    cdef bint _wants(self, rconn_t* c, int64_t user_id) noexcept nogil:
        cdef int i
        for i in range(c.ndeliver):
            if c.deliver_users[i] == user_id:
                return True
        return False

    cdef stream_t* _stream(self, rconn_t* c, uint32_t ssrc, int64_t user_id) noexcept nogil:
        cdef int i, err = 0
        cdef stream_t* st
        cdef stream_t** grown
        for i in range(c.nstreams):
            st = c.streams[i]
            if st.ssrc == ssrc:
                if st.user_id != user_id:
                    st.user_id = user_id
                    st.deliver = self._wants(c, user_id)
                return st
        if c.nstreams == c.capstreams:
            grown = <stream_t**>realloc(c.streams, (c.capstreams * 2 + 8) * sizeof(stream_t*))
            if grown == NULL:
                return NULL
            c.streams = grown
            c.capstreams = c.capstreams * 2 + 8
        st = <stream_t*>calloc(1, sizeof(stream_t))
        if st == NULL:
            return NULL
        st.dec = opus_decoder_create(48000, 2, &err)
        if st.dec == NULL or err != OPUS_OK:
            free(st)
            return NULL
        st.ssrc = ssrc
        st.user_id = user_id
        st.deliver = self._wants(c, user_id)
        # adaptive: grows by a frame per late packet (up to 200 ms), back to the configured depth
        # after 10 s without one
        jb_init(&st.jb, c.depth, c.depth, 10, True)
        c.streams[c.nstreams] = st
        c.nstreams += 1
        return st

    # -- per packet (lock held, no GIL) -------------------------------------------------------------
    cdef void _packet(self, rconn_t* c, const unsigned char* pkt, int n, int64_t now) noexcept nogil:
        cdef Py_ssize_t off = 0, plen
        cdef uint32_t counter = 0
        c.packets += 1
        if n < 0:
            c.other += 1
            return
        c.bytes += n
        cdef int kind = rtp_classify(pkt, n)
        if kind == PACKET_RTCP:
            c.rtcp += 1
            return
        if kind != PACKET_RTP:
            c.other += 1           # IP discovery / keepalive echoes, noise
            return
        if (pkt[1] & 0x7F) != 0x78:
            c.not_audio += 1
            return
        if not c.has_key:
            c.decrypt_failures += 1
            return
        plen = aead_open(&c.aead, pkt, n, self._open_buf, &off, &counter)
        if plen < 0:
            c.decrypt_failures += 1
            return
        self._route(c, _load32(pkt + 8), _load16(pkt + 2), _load32(pkt + 4), self._open_buf + off,
                    <int>plen, now)

    cdef void _route(self, rconn_t* c, uint32_t ssrc, uint16_t seq, uint32_t ts,
                     const unsigned char* payload, int plen, int64_t now) noexcept nogil:
        cdef int64_t uid = self._user_of(c, ssrc)
        cdef pend_t* p
        cdef work_t* w
        if plen > JB_SLOT_BYTES:
            c.other += 1
            return
        if uid == 0:
            # Audio before its op 5: hold it (bounded) until the SSRC is mapped.
            if c.pending == NULL:
                c.pending = <pend_t*>malloc(RX_PENDING_MAX * sizeof(pend_t))
                if c.pending == NULL:
                    c.unmapped_dropped += 1
                    return
            if c.npending == RX_PENDING_MAX:
                memmove(c.pending, c.pending + 1, (RX_PENDING_MAX - 1) * sizeof(pend_t))
                c.npending -= 1
                c.unmapped_dropped += 1
            p = &c.pending[c.npending]
            p.ssrc, p.seq, p.ts, p.arrival_ns, p.len = ssrc, seq, ts, now, plen
            memcpy(p.data, payload, plen)
            c.npending += 1
            c.unmapped_held += 1
            return
        if c.has_decryptor and not _is_silence(payload, plen):
            # Silence frames are never DAVE-encrypted (spec §2.5): they skip the hook.
            if self._nwork == WORK_MAX:
                self._flush_work()
            w = &self._work[self._nwork]
            w.conn, w.ssrc, w.user_id, w.seq, w.ts, w.arrival_ns, w.len = c, ssrc, uid, seq, ts, now, plen
            memcpy(w.data, payload, plen)
            self._nwork += 1
            return
        self._push(c, ssrc, uid, seq, ts, payload, plen, now)

    cdef void _push(self, rconn_t* c, uint32_t ssrc, int64_t uid, uint16_t seq, uint32_t ts,
                    const unsigned char* payload, int plen, int64_t arrival) noexcept nogil:
        cdef stream_t* st = self._stream(c, ssrc, uid)
        if st == NULL:
            c.other += 1
            return
        st.packets += 1
        jb_push(&st.jb, seq, ts, payload, plen, arrival)

    cdef void _release_pending(self, rconn_t* c) noexcept nogil:
        cdef int i, kept = 0
        cdef pend_t* p
        cdef int64_t uid
        c.pending_dirty = False
        for i in range(c.npending):
            p = &c.pending[i]
            uid = self._user_of(c, p.ssrc)
            if uid == 0:
                if kept != i:
                    memcpy(&c.pending[kept], p, sizeof(pend_t))
                kept += 1
            else:
                self._route(c, p.ssrc, p.seq, p.ts, p.data, p.len, p.arrival_ns)
        c.npending = kept

    cdef void _expire_pending(self, rconn_t* c, int64_t now) noexcept nogil:
        cdef int i = 0
        while i < c.npending and c.pending[i].arrival_ns < now - RX_PENDING_NS:
            i += 1
        if i:
            memmove(c.pending, c.pending + i, (c.npending - i) * sizeof(pend_t))
            c.npending -= i
            c.unmapped_dropped += i

    cdef void _flush_work(self) noexcept nogil:
        """Run the round's DAVE frames through their decryptors: one GIL hold for all of them."""
        cdef int i
        cdef work_t* w
        if self._nwork == 0:
            return
        with gil:
            self._call_decryptors()
        for i in range(self._nwork):
            w = &self._work[i]
            if w.len < 0:
                w.conn.dave_failures += 1
            else:
                self._push(w.conn, w.ssrc, w.user_id, w.seq, w.ts, w.data, w.len, w.arrival_ns)
        self._nwork = 0

    cdef void _call_decryptors(self) noexcept:
        cdef int i
        cdef work_t* w
        cdef Py_ssize_t n
        for i in range(self._nwork):
            w = &self._work[i]
            fn = self._decryptors.get(w.conn.id)
            if fn is None:
                continue
            try:
                out = fn(w.user_id, PyBytes_FromStringAndSize(<const char*>w.data, w.len))
                if out is None:
                    w.len = -1
                    continue
                out = bytes(out)
                n = PyBytes_GET_SIZE(out)
                if n > JB_SLOT_BYTES:
                    w.len = -1
                    continue
                memcpy(w.data, PyBytes_AS_STRING(out), n)
                w.len = <int>n
            except BaseException as exc:   # never crosses into C: becomes an "error" record
                w.len = -1
                if len(self._errors) < 100:
                    self._errors.append((w.conn.id, f"frame decryptor raised {exc!r}"))

    cdef void _recv_conn(self, rconn_t* c, int64_t now) noexcept nogil:
        cdef int n, i
        cdef int64_t offset = tc_realtime_offset_ns(), stamp, arrival
        while True:
            n = tc_rx_recv(c.fd, self._rx)
            if n < 0:
                c.recv_errors += 1       # e.g. ECONNREFUSED from an ICMP error: nothing to read
                return
            for i in range(n):
                # The kernel's arrival stamp when there is one: a receive thread that got the CPU
                # late (loaded machine) must not shift a talk spurt on the timeline.
                stamp = tc_rx_stamp_ns(self._rx, i)
                arrival = stamp - offset if stamp else now
                if arrival > now:
                    arrival = now
                self._packet(c, tc_rx_data(self._rx, i), tc_rx_len(self._rx, i), arrival)
            if n < TC_RX_BATCH:
                return

    # -- per tick (lock held, no GIL) ---------------------------------------------------------------
    cdef bint _rec(self, int kind, int flags, int64_t conn_id, int64_t user_id, uint32_t ssrc,
                   uint32_t ts, int64_t time_ns, const int16_t* pcm, int nsamples) noexcept nogil:
        cdef batch_t* b = self._cur
        cdef orec_t* r
        cdef Py_ssize_t need = nsamples * 2
        cdef void* grown
        if b.nrecs == b.caprecs:
            grown = realloc(b.recs, (b.caprecs * 2 + 64) * sizeof(orec_t))
            if grown == NULL:
                return False
            b.recs = <orec_t*>grown
            b.caprecs = b.caprecs * 2 + 64
        if need and b.npcm + need > b.cappcm:
            grown = realloc(b.pcm, (b.cappcm * 2 + need + 1920 * 16) * sizeof(int16_t))
            if grown == NULL:
                return False
            b.pcm = <int16_t*>grown
            b.cappcm = b.cappcm * 2 + need + 1920 * 16
        r = &b.recs[b.nrecs]
        r.kind, r.flags, r.conn_id, r.user_id, r.ssrc, r.rtp_ts = kind, flags, conn_id, user_id, ssrc, ts
        r.time_ns, r.nsamples, r.pcm_off = time_ns, nsamples, b.npcm
        if need:
            memcpy(b.pcm + b.npcm, pcm, need * sizeof(int16_t))
            b.npcm += need
        b.nrecs += 1
        return True

    cdef void _play(self, rconn_t* c, stream_t* st) noexcept nogil:
        cdef jb_out out
        cdef int kind = jb_pop(&st.jb, &out)
        cdef int n = 0, flags = 0
        if kind == JB_NONE:
            return
        if kind == JB_END:
            if st.speaking:
                st.speaking = False
                self._rec(REC_SPEAKING_STOP, 0, c.id, st.user_id, st.ssrc, 0, 0, NULL, 0)
            return
        if out.spurt_start:
            flags |= RF_SPURT_START
            if not st.speaking:
                st.speaking = True
                self._rec(REC_SPEAKING_START, 0, c.id, st.user_id, st.ssrc, out.ts, out.time_ns, NULL, 0)
        if not st.deliver and c.mux == NULL:
            return            # nobody listens: keep the jitter state and events, skip the decode
        if kind == JB_FRAME:
            n = opus_decode(st.dec, out.payload, out.len, self._pcm, RX_FRAME_MAX, 0) if out.len else -1
            if n < 0:
                if out.len:
                    st.decode_errors += 1
                n = opus_decode(st.dec, NULL, 0, self._pcm, FRAME, 0)
                flags |= RF_CONCEALED
            st.frames += 1
        else:
            if out.fec != NULL and _has_fec(out.fec, out.fec_len):
                n = opus_decode(st.dec, out.fec, out.fec_len, self._pcm, FRAME, 1)
                if n > 0:
                    flags |= RF_FEC
                    st.fec_recovered += 1
            if n <= 0:
                n = opus_decode(st.dec, NULL, 0, self._pcm, FRAME, 0)
                flags |= RF_CONCEALED
                st.concealed += 1
        if n <= 0:
            st.decode_errors += 1
            return
        if st.deliver:
            self._rec(REC_FRAME, flags, c.id, st.user_id, st.ssrc, out.ts, out.time_ns, self._pcm, n)
        if c.mux != NULL:
            _mux_add(c.mux, out.time_ns, self._pcm, n)

    @cython.cdivision(True)
    cdef void _mux_emit(self, mux_t* m, int64_t now) noexcept nogil:
        cdef int blocks = 0
        cdef int64_t idx
        while blocks < 250:
            if m.origin_ns + _samples_to_ns(m.emitted + FRAME) + m.delay_ns > now:
                break
            idx = m.emitted % MUX_RING      # MUX_RING is a multiple of FRAME: a block never wraps
            mix_saturate(self._pcm, m.acc + 2 * idx, 2 * FRAME)
            if not self._rec(REC_MUX, 0, 0, m.id, 0, 0, m.origin_ns + _samples_to_ns(m.emitted),
                             self._pcm, FRAME):
                break
            mix_clear(m.acc + 2 * idx, 2 * FRAME)
            m.emitted += FRAME
            m.blocks += 1
            blocks += 1

    cdef void _enqueue(self) noexcept nogil:
        cdef batch_t* b = self._cur
        if b.nrecs == 0:
            return
        if self._qlen == RX_QUEUE:
            # The output worker is behind by 640 ms: drop this tick's batch and count it.
            self.batches_dropped += 1
            self.records_dropped += b.nrecs
            b.nrecs = 0
            b.npcm = 0
            return
        fresh = <batch_t*>calloc(1, sizeof(batch_t))
        if fresh == NULL:
            b.nrecs = 0
            b.npcm = 0
            return
        self._queue[(self._qhead + self._qlen) % RX_QUEUE] = b
        self._qlen += 1
        self._cur = fresh
        tc_cond_signal(&self._cond)

    cdef void _tick(self, int64_t now) noexcept nogil:
        cdef int i, j
        cdef rconn_t* c
        self.ticks += 1
        for i in range(self._nconns):
            c = self._conns[i]
            if c.npending:
                self._expire_pending(c, now)
            for j in range(c.nstreams):
                self._play(c, c.streams[j])
        for i in range(self._nmuxes):
            self._mux_emit(self._muxes[i], now)
        self._enqueue()

    # -- the thread ---------------------------------------------------------------------------------
    cdef void _run(self) noexcept nogil:
        cdef uint64_t tags[64]
        cdef int n, i, k
        cdef uint64_t due
        cdef int64_t now, t0
        cdef rconn_t* c
        while not self._stop:
            n = tc_epoll_wait(self._epfd, tags, 64, 100)
            now = tc_now_ns()
            t0 = now
            due = 0
            tc_mutex_lock(&self._lock)
            for i in range(n):
                if tags[i] == TAG_TIMER:
                    due = tc_timerfd_read(self._tfd)
                elif tags[i] == TAG_WAKE:
                    tc_eventfd_drain(self._wakefd)
                else:
                    c = self._conn(<int64_t>tags[i])
                    if c != NULL:
                        self._recv_conn(c, now)
            for i in range(self._nconns):
                if self._conns[i].pending_dirty:
                    self._release_pending(self._conns[i])
            self._flush_work()
            if due > MAX_CATCHUP:
                self.ticks_skipped += <int64_t>(due - MAX_CATCHUP)
                due = MAX_CATCHUP
            for k in range(<int>due):
                self._tick(now)
            self.busy_ns += tc_now_ns() - t0
            tc_mutex_unlock(&self._lock)

    def _thread_main(self):
        with nogil:
            self._run()

    def start(self):
        """Start the receive thread (idempotent)."""
        import threading
        if self._running:
            return
        self._tfd = tc_timerfd_periodic(TICK_NS)
        if self._tfd < 0:
            raise OSError("could not create the receive core's timerfd")
        tc_epoll_add(self._epfd, self._tfd, TAG_TIMER)
        self._stop = False
        self._running = True
        self._thread = threading.Thread(target=self._thread_main, name="telecom-receive", daemon=True)
        self._thread.start()

    def stop(self, timeout=2.0):
        if not self._running:
            return
        self._stop = True
        tc_eventfd_signal(self._wakefd)
        self._thread.join(timeout)
        self._running = False

    @property
    def running(self):
        return self._running and self._thread is not None and self._thread.is_alive()

    # -- Python side: connections ---------------------------------------------------------------------
    def add_connection(self, int64_t conn_id, int fd, str mode, bytes key not None, int depth=3):
        """Start receiving on ``fd`` (a connected UDP socket the caller keeps open until removal)."""
        if mode not in _MODES:
            raise ConfigurationError(f"unknown transport mode {mode!r}")
        if len(key) != 32:
            raise ConfigurationError("the secret key must be 32 bytes")
        if not 1 <= depth <= 10:
            raise ConfigurationError("depth must be 1..10 frames")
        cdef int m = _MODES[mode], rc, err
        cdef const unsigned char* k = key
        cdef rconn_t* c = <rconn_t*>calloc(1, sizeof(rconn_t))
        cdef rconn_t** grown
        if c == NULL:
            raise MemoryError()
        c.id, c.fd, c.depth = conn_id, fd, depth
        rc = aead_init(&c.aead, m, k)
        if rc < 0:
            _conn_free(c)
            raise TelecomError(f"AEAD init failed ({rc})")
        c.has_key = True
        with nogil:
            tc_mutex_lock(&self._lock)
        try:
            if self._conn(conn_id) != NULL:
                _conn_free(c)
                raise ConfigurationError(f"connection {conn_id} is already receiving")
            if self._nconns == self._capconns:
                grown = <rconn_t**>realloc(self._conns, (self._capconns * 2 + 8) * sizeof(rconn_t*))
                if grown == NULL:
                    _conn_free(c)
                    raise MemoryError()
                self._conns = grown
                self._capconns = self._capconns * 2 + 8
            if fd >= 0:
                tc_enable_rx_timestamps(fd)      # best effort: without it, arrival = wake-up time
                err = tc_epoll_add(self._epfd, fd, <uint64_t>conn_id)
                if err:
                    _conn_free(c)
                    raise OSError(err, f"epoll_ctl(ADD) failed for fd {fd}")
            self._conns[self._nconns] = c
            self._nconns += 1
        finally:
            tc_mutex_unlock(&self._lock)

    def remove_connection(self, int64_t conn_id):
        """Stop receiving (before the caller closes the socket). Returns the final stats or None."""
        cdef int i
        cdef rconn_t* c = NULL
        with nogil:
            tc_mutex_lock(&self._lock)
        try:
            for i in range(self._nconns):
                if self._conns[i].id == conn_id:
                    c = self._conns[i]
                    self._conns[i] = self._conns[self._nconns - 1]
                    self._nconns -= 1
                    break
            if c == NULL:
                return None
            stats = self._conn_stats(c)
            if c.fd >= 0:
                tc_epoll_del(self._epfd, c.fd)
            if c.mux != NULL:
                c.mux.refs -= 1
            _conn_free(c)
            self._decryptors.pop(conn_id, None)
            return stats
        finally:
            tc_mutex_unlock(&self._lock)

    cdef rconn_t* _locked_conn(self, int64_t conn_id) except NULL:
        # lock held by the caller
        cdef rconn_t* c = self._conn(conn_id)
        if c == NULL:
            raise ConfigurationError(f"connection {conn_id} is not receiving")
        return c

    def map_ssrc(self, int64_t conn_id, uint32_t ssrc, int64_t user_id):
        """op 5: packets of ``ssrc`` belong to ``user_id`` (held packets of that SSRC are released)."""
        cdef rconn_t* c
        cdef int i
        cdef void* grown
        if user_id <= 0:
            raise ConfigurationError("user_id must be positive")
        with nogil:
            tc_mutex_lock(&self._lock)
        try:
            c = self._locked_conn(conn_id)
            for i in range(c.nmap):
                if c.map[i].ssrc == ssrc:
                    c.map[i].user_id = user_id
                    break
            else:
                if c.nmap == c.capmap:
                    grown = realloc(c.map, (c.capmap * 2 + 8) * sizeof(ssrc_map_t))
                    if grown == NULL:
                        raise MemoryError()
                    c.map = <ssrc_map_t*>grown
                    c.capmap = c.capmap * 2 + 8
                c.map[c.nmap].ssrc = ssrc
                c.map[c.nmap].user_id = user_id
                c.nmap += 1
            if c.npending:
                c.pending_dirty = True
        finally:
            tc_mutex_unlock(&self._lock)

    def unmap_user(self, int64_t conn_id, int64_t user_id):
        """op 13: forget the user's SSRCs and streams. Returns True when they were speaking."""
        cdef rconn_t* c
        cdef int i = 0, kept = 0
        cdef bint was_speaking = False
        with nogil:
            tc_mutex_lock(&self._lock)
        try:
            c = self._conn(conn_id)
            if c == NULL:
                return False
            for i in range(c.nmap):
                if c.map[i].user_id != user_id:
                    c.map[kept] = c.map[i]
                    kept += 1
            c.nmap = kept
            kept = 0
            for i in range(c.nstreams):
                if c.streams[i].user_id == user_id:
                    was_speaking = was_speaking or c.streams[i].speaking
                    _stream_free(c.streams[i])
                else:
                    c.streams[kept] = c.streams[i]
                    kept += 1
            c.nstreams = kept
            return was_speaking
        finally:
            tc_mutex_unlock(&self._lock)

    def set_deliver(self, int64_t conn_id, int64_t user_id, bint on):
        """Whether the user's decoded frames go to Python (a per-user output is set)."""
        cdef rconn_t* c
        cdef int i, kept = 0
        with nogil:
            tc_mutex_lock(&self._lock)
        try:
            c = self._locked_conn(conn_id)
            for i in range(c.ndeliver):
                if c.deliver_users[i] != user_id:
                    c.deliver_users[kept] = c.deliver_users[i]
                    kept += 1
            c.ndeliver = kept
            if on:
                if c.ndeliver == RX_MAX_DELIVER:
                    raise ConfigurationError(f"at most {RX_MAX_DELIVER} per-user outputs per connection")
                c.deliver_users[c.ndeliver] = user_id
                c.ndeliver += 1
            for i in range(c.nstreams):
                if c.streams[i].user_id == user_id:
                    c.streams[i].deliver = on
        finally:
            tc_mutex_unlock(&self._lock)

    def set_decryptor(self, int64_t conn_id, fn):
        """``fn(user_id, payload) -> bytes | None`` for every non-silence frame, or None to remove."""
        cdef rconn_t* c
        if fn is not None and not callable(fn):
            raise ConfigurationError("the frame decryptor must be callable or None")
        with nogil:
            tc_mutex_lock(&self._lock)
        try:
            c = self._locked_conn(conn_id)
            if fn is None:
                self._decryptors.pop(conn_id, None)
            else:
                self._decryptors[conn_id] = fn
            c.has_decryptor = fn is not None
        finally:
            tc_mutex_unlock(&self._lock)

    # -- muxers ---------------------------------------------------------------------------------------
    def add_muxer(self, int64_t mux_id, int64_t delay_ns=MUX_DELAY_DEFAULT_NS, origin_ns=None):
        """A muxer whose timeline starts now (or at ``origin_ns``) and emits each 20 ms block
        ``delay_ns`` after it ends (the time late speakers have to arrive)."""
        cdef mux_t* m = <mux_t*>calloc(1, sizeof(mux_t))
        cdef void* grown
        if m == NULL:
            raise MemoryError()
        m.acc = <int32_t*>calloc(MUX_RING * 2, sizeof(int32_t))
        if m.acc == NULL:
            free(m)
            raise MemoryError()
        m.id, m.delay_ns = mux_id, delay_ns
        m.origin_ns = tc_now_ns() if origin_ns is None else origin_ns
        with nogil:
            tc_mutex_lock(&self._lock)
        try:
            if self._nmuxes == self._capmuxes:
                grown = realloc(self._muxes, (self._capmuxes * 2 + 4) * sizeof(mux_t*))
                if grown == NULL:
                    free(m.acc)
                    free(m)
                    raise MemoryError()
                self._muxes = <mux_t**>grown
                self._capmuxes = self._capmuxes * 2 + 4
            self._muxes[self._nmuxes] = m
            self._nmuxes += 1
        finally:
            tc_mutex_unlock(&self._lock)

    def remove_muxer(self, int64_t mux_id):
        cdef int i
        cdef mux_t* m = NULL
        with nogil:
            tc_mutex_lock(&self._lock)
        try:
            for i in range(self._nmuxes):
                if self._muxes[i].id == mux_id:
                    m = self._muxes[i]
                    self._muxes[i] = self._muxes[self._nmuxes - 1]
                    self._nmuxes -= 1
                    break
            if m == NULL:
                return
            for i in range(self._nconns):
                if self._conns[i].mux == m:
                    self._conns[i].mux = NULL
            free(m.acc)
            free(m)
        finally:
            tc_mutex_unlock(&self._lock)

    def attach_muxer(self, int64_t conn_id, int64_t mux_id):
        """Mix this connection's speakers into muxer ``mux_id`` (0: detach)."""
        cdef rconn_t* c
        cdef mux_t* m = NULL
        with nogil:
            tc_mutex_lock(&self._lock)
        try:
            c = self._locked_conn(conn_id)
            if mux_id:
                m = self._mux(mux_id)
                if m == NULL:
                    raise ConfigurationError(f"no muxer {mux_id}")
            c.mux = m
        finally:
            tc_mutex_unlock(&self._lock)

    def mux_add_pcm(self, int64_t mux_id, int64_t time_ns, const unsigned char[::1] pcm not None):
        """Mix s16le stereo 48 kHz ``pcm`` into a muxer at ``time_ns`` (CLOCK_MONOTONIC), e.g. what
        this client sends (``include_self``)."""
        cdef mux_t* m
        cdef Py_ssize_t n = pcm.shape[0] // 4, done = 0, cnt
        if n == 0:
            return
        with nogil:
            tc_mutex_lock(&self._lock)
            m = self._mux(mux_id)
            if m != NULL:
                while done < n:
                    cnt = n - done
                    if cnt > MUX_RING // 2:
                        cnt = MUX_RING // 2
                    _mux_add(m, time_ns + _samples_to_ns(done),
                             <const int16_t*>&pcm[done * 4], <int>cnt)
                    done += cnt
            tc_mutex_unlock(&self._lock)

    # -- driving without the thread (tests, benchmarks) -------------------------------------------------
    def feed(self, int64_t conn_id, packets, arrival_ns=None):
        """Process wire packets as if ``conn_id``'s socket had received them (at ``arrival_ns``)."""
        cdef rconn_t* c
        cdef int64_t now = tc_now_ns() if arrival_ns is None else arrival_ns
        cdef bytes pkt
        with nogil:
            tc_mutex_lock(&self._lock)
        try:
            c = self._locked_conn(conn_id)
            for pkt in packets:
                self._packet(c, <const unsigned char*>PyBytes_AS_STRING(pkt), <int>len(pkt), now)
            if c.pending_dirty:
                self._release_pending(c)
        finally:
            tc_mutex_unlock(&self._lock)
        # outside the lock: the decryptors run with the GIL, exactly as from the thread
        with nogil:
            tc_mutex_lock(&self._lock)
            self._flush_work()
            tc_mutex_unlock(&self._lock)

    def tick(self, now_ns=None):
        """Run one 20 ms playout tick (when the thread is not running)."""
        cdef int64_t now = tc_now_ns() if now_ns is None else now_ns
        with nogil:
            tc_mutex_lock(&self._lock)
            self._tick(now)
            tc_mutex_unlock(&self._lock)

    def run_ticks(self, list ticks, int64_t start_ns, bint drain=True):
        """Benchmark driver: ``ticks`` is a list (one entry per 20 ms tick) of lists of
        ``(conn_id, wire_packet)``; each tick's packets are processed, then the tick runs, all without
        the GIL and without sockets. Returns the nanoseconds spent. ``drain`` frees the batches."""
        cdef Py_ssize_t nt = len(ticks), total = 0, i, j, k = 0
        cdef Py_ssize_t* counts = <Py_ssize_t*>malloc((nt + 1) * sizeof(Py_ssize_t))
        cdef const unsigned char** ptrs
        cdef int* lens
        cdef int64_t* conn_ids
        cdef rconn_t* c
        cdef int64_t t0, t1, missing = 0
        cdef batch_t* b
        for i in range(nt):
            counts[i] = len(ticks[i])
            total += counts[i]
        ptrs = <const unsigned char**>malloc((total + 1) * sizeof(void*))
        lens = <int*>malloc((total + 1) * sizeof(int))
        conn_ids = <int64_t*>malloc((total + 1) * sizeof(int64_t))
        keep = []
        for i in range(nt):
            for conn_id, pkt in ticks[i]:
                if not isinstance(pkt, bytes):
                    raise TypeError("packets must be bytes")
                keep.append(pkt)
                ptrs[k] = <const unsigned char*>PyBytes_AS_STRING(pkt)
                lens[k] = <int>len(pkt)
                conn_ids[k] = conn_id
                k += 1
        with nogil:
            tc_mutex_lock(&self._lock)
            t0 = tc_now_ns()
            k = 0
            for i in range(nt):
                for j in range(counts[i]):
                    c = self._conn(conn_ids[k])
                    if c == NULL:
                        missing += 1
                    else:
                        self._packet(c, ptrs[k], lens[k], start_ns + i * TICK_NS)
                    k += 1
                self._flush_work()
                self._tick(start_ns + i * TICK_NS)
                if drain:
                    while self._qlen:
                        b = self._queue[self._qhead]
                        self._qhead = (self._qhead + 1) % RX_QUEUE
                        self._qlen -= 1
                        _batch_free(b)
            t1 = tc_now_ns()
            tc_mutex_unlock(&self._lock)
        free(counts)
        free(ptrs)
        free(lens)
        free(conn_ids)
        if missing:
            raise ConfigurationError(f"{missing} packets named a connection that is not receiving")
        return t1 - t0

    @property
    def thread_native_id(self):
        """The receive thread's kernel thread id (for CPU accounting), or None."""
        return None if self._thread is None else self._thread.native_id

    # -- the output worker's side -----------------------------------------------------------------------
    def next_batch(self, double timeout=0.5):
        """Wait (GIL released) for the next tick's batch; returns a list of records
        ``(kind, flags, conn_id, user_id, ssrc, rtp_ts, time_ns, pcm)`` (``kind`` as in REC_KINDS, or
        ``"error"`` with ``(conn_id, message)``), or an empty list on timeout."""
        cdef batch_t* b = NULL
        cdef int64_t deadline = tc_now_ns() + <int64_t>(timeout * 1e9)
        cdef int i
        cdef orec_t* r
        out = []
        if self._errors:
            errors, self._errors = self._errors, []
            out.extend(("error", 0, conn_id, 0, 0, 0, 0, message) for conn_id, message in errors)
        with nogil:
            tc_mutex_lock(&self._lock)
            if self._qlen == 0 and timeout > 0:
                tc_cond_wait_until(&self._cond, &self._lock, deadline)
            if self._qlen:
                b = self._queue[self._qhead]
                self._qhead = (self._qhead + 1) % RX_QUEUE
                self._qlen -= 1
            tc_mutex_unlock(&self._lock)
        if b == NULL:
            return out
        try:
            for i in range(b.nrecs):
                r = &b.recs[i]
                pcm = (PyBytes_FromStringAndSize(<const char*>(b.pcm + r.pcm_off), r.nsamples * 4)
                       if r.nsamples else None)
                out.append((REC_KINDS[r.kind], r.flags, r.conn_id, r.user_id, r.ssrc, r.rtp_ts,
                            r.time_ns, pcm))
        finally:
            _batch_free(b)
        return out

    def wake(self):
        """Wake a next_batch() waiter (used at shutdown)."""
        with nogil:
            tc_mutex_lock(&self._lock)
            tc_cond_broadcast(&self._cond)
            tc_mutex_unlock(&self._lock)

    # -- stats ------------------------------------------------------------------------------------------
    cdef dict _conn_stats(self, rconn_t* c):
        cdef int i
        cdef stream_t* st
        users = []
        totals = dict.fromkeys(("lost", "concealed", "fec_recovered", "late", "duplicates",
                                "frames", "decode_errors"), 0)
        for i in range(c.nstreams):
            st = c.streams[i]
            u = {"user_id": st.user_id, "ssrc": st.ssrc, "packets": st.packets, "frames": st.frames,
                 "lost": st.jb.lost, "concealed": st.concealed, "fec_recovered": st.fec_recovered,
                 "late": st.jb.late, "duplicates": st.jb.duplicates, "decode_errors": st.decode_errors,
                 "jitter_depth": st.jb.depth, "buffered": st.jb.count, "speaking": bool(st.speaking)}
            for key in totals:
                totals[key] += u[key]
            users.append(u)
        out = {"packets_received": c.packets, "bytes_received": c.bytes, "rtcp_received": c.rtcp,
               "other_received": c.other, "not_audio": c.not_audio, "decrypt_failures": c.decrypt_failures,
               "dave_failures": c.dave_failures, "unmapped_held": c.unmapped_held,
               "unmapped_dropped": c.unmapped_dropped, "unmapped_waiting": c.npending,
               "recv_errors": c.recv_errors}
        out.update(totals)
        out["users"] = users
        if c.mux != NULL:
            out["muxer"] = {"id": c.mux.id, "blocks": c.mux.blocks, "late_samples": c.mux.late_samples,
                            "frames_in": c.mux.frames_in}
        return out

    def conn_stats(self, int64_t conn_id):
        cdef rconn_t* c
        with nogil:
            tc_mutex_lock(&self._lock)
        try:
            c = self._conn(conn_id)
            return None if c == NULL else self._conn_stats(c)
        finally:
            tc_mutex_unlock(&self._lock)

    def muxer_stats(self, int64_t mux_id):
        cdef mux_t* m
        with nogil:
            tc_mutex_lock(&self._lock)
        try:
            m = self._mux(mux_id)
            if m == NULL:
                return None
            return {"blocks": m.blocks, "late_samples": m.late_samples, "frames_in": m.frames_in,
                    "origin_ns": m.origin_ns, "delay_ns": m.delay_ns}
        finally:
            tc_mutex_unlock(&self._lock)

    def stats(self):
        return {"ticks": self.ticks, "ticks_skipped": self.ticks_skipped,
                "batches_dropped": self.batches_dropped, "records_dropped": self.records_dropped,
                "busy_ns": self.busy_ns, "connections": self._nconns, "muxers": self._nmuxes,
                "queued_batches": self._qlen}


def now_ns():
    """CLOCK_MONOTONIC in ns: the arrival clock every ``time_ns`` of this module is on."""
    return tc_now_ns()
