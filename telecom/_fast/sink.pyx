# cython: language_level=3
"""A native RTP sink for the density benchmark: drains many UDP sockets with ``recvmmsg`` and keeps
per-SSRC counts, sequence gaps and kernel arrival times without the GIL.

What it owns: a few UDP sockets on loopback (big receive buffers, ``SO_RCVBUFFORCE`` when root),
one receive thread, per-SSRC state in an open-addressing table, histograms of packet spacing and of
spacing deviation (arrival delta minus RTP timestamp delta), and optional per-packet traces of a
few SSRCs (for send-to-arrival latency).

What it must not do: decrypt or decode. It reads only the clear RTP header (seq, timestamp, SSRC)
and the datagram size. It never sleeps in a socket call: an empty pass sleeps 100 µs in
``nanosleep`` so that senders never pay for waking it (PERFORMANCE.md, "loopback trap"); the kernel
timestamp (SO_TIMESTAMPNS) is taken on arrival, so that nap does not blur the timing.

Run in its own process: ``python -c "from telecom._fast.sink import serve; serve()"`` prints a JSON
line with its ports, then answers ``reset`` / ``trace <ssrc>...`` / ``report`` / ``quit`` on stdin.
"""

from libc.stdint cimport int64_t, uint16_t, uint32_t

import json
import sys
import threading

from telecom.errors import ConfigurationError


cdef extern from *:
    """
    #include <errno.h>
    #include <netinet/in.h>
    #include <stdint.h>
    #include <stdlib.h>
    #include <string.h>
    #include <sys/socket.h>
    #include <time.h>
    #include <unistd.h>

    #define TS_VLEN 64
    #define TS_BUF 1536
    #define TS_SLOTS 65536              /* power of two; at most half used */
    #define TS_BIN_NS 10000             /* histogram bins of 10 us */
    #define TS_BINS 20000               /* 0..200 ms, plus one overflow bin */
    #define TS_MAX_FDS 64
    #define TS_MAX_TRACE 64
    #define TS_TRACE_CAP 8192

    typedef struct {
        uint32_t ssrc;
        int used;
        int trace;                      /* index into the traces, or -1 */
        int64_t count;
        uint16_t last_seq;
        uint32_t last_ts;
        int64_t last_ns;
        int64_t lost;
        int64_t reordered;
        int64_t duplicates;
        int64_t bytes;
    } ts_stream;

    typedef struct {
        int nfd;
        int fds[TS_MAX_FDS];
        ts_stream *slots;
        int64_t nstreams, overflow_streams;
        int64_t spacing_hist[TS_BINS + 1];
        int64_t dev_hist[TS_BINS + 1];
        int64_t max_spacing_ns, max_dev_ns, spacing_samples;
        int64_t packets, bytes, non_rtp, first_ns, last_ns, batches, empty_polls;
        int ntrace;
        uint32_t trace_ssrc[TS_MAX_TRACE];
        int64_t *trace_ns[TS_MAX_TRACE];
        uint16_t *trace_seq[TS_MAX_TRACE];
        uint16_t *trace_size[TS_MAX_TRACE];
        int trace_len[TS_MAX_TRACE];
        int running, reset;
        struct mmsghdr msgs[TS_VLEN];
        struct iovec iov[TS_VLEN];
        unsigned char bufs[TS_VLEN][TS_BUF];
        char ctrl[TS_VLEN][64];
    } ts_sink;

    static int64_t ts_realtime_ns(void) {
        struct timespec t;
        clock_gettime(CLOCK_REALTIME, &t);
        return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
    }

    static ts_stream *ts_lookup(ts_sink *s, uint32_t ssrc, int create) {
        uint32_t h = (ssrc * 2654435761u) >> 8;
        for (int probe = 0; probe < TS_SLOTS; probe++) {
            ts_stream *st = &s->slots[(h + probe) & (TS_SLOTS - 1)];
            if (st->used && st->ssrc == ssrc) return st;
            if (!st->used) {
                if (!create) return NULL;
                if (s->nstreams >= TS_SLOTS / 2) { s->overflow_streams++; return NULL; }
                st->used = 1; st->ssrc = ssrc; st->trace = -1;
                for (int i = 0; i < s->ntrace; i++) if (s->trace_ssrc[i] == ssrc) st->trace = i;
                s->nstreams++;
                return st;
            }
        }
        return NULL;
    }

    static void ts_clear(ts_sink *s) {
        memset(s->slots, 0, sizeof(ts_stream) * TS_SLOTS);
        memset(s->spacing_hist, 0, sizeof s->spacing_hist);
        memset(s->dev_hist, 0, sizeof s->dev_hist);
        s->nstreams = s->overflow_streams = 0;
        s->max_spacing_ns = s->max_dev_ns = s->spacing_samples = 0;
        s->packets = s->bytes = s->non_rtp = s->first_ns = s->last_ns = s->batches = s->empty_polls = 0;
        for (int i = 0; i < s->ntrace; i++) s->trace_len[i] = 0;
    }

    static void ts_packet(ts_sink *s, const unsigned char *p, int n, int64_t ns) {
        if (n < 12 || (p[0] >> 6) != 2 || (p[1] & 0x7f) != 0x78) { s->non_rtp++; return; }
        uint16_t seq = (uint16_t)((p[2] << 8) | p[3]);
        uint32_t ts = ((uint32_t)p[4] << 24) | ((uint32_t)p[5] << 16) | ((uint32_t)p[6] << 8) | p[7];
        uint32_t ssrc = ((uint32_t)p[8] << 24) | ((uint32_t)p[9] << 16) | ((uint32_t)p[10] << 8) | p[11];
        s->packets++; s->bytes += n;
        if (!s->first_ns) s->first_ns = ns;
        s->last_ns = ns;
        ts_stream *st = ts_lookup(s, ssrc, 1);
        if (!st) return;
        st->bytes += n;
        if (st->trace >= 0 && s->trace_len[st->trace] < TS_TRACE_CAP) {
            int k = s->trace_len[st->trace]++;
            s->trace_ns[st->trace][k] = ns;
            s->trace_seq[st->trace][k] = seq;
            s->trace_size[st->trace][k] = (uint16_t)n;
        }
        if (st->count++ == 0) { st->last_seq = seq; st->last_ts = ts; st->last_ns = ns; return; }
        uint16_t d = (uint16_t)(seq - st->last_seq);
        if (d == 0) { st->duplicates++; return; }
        if (d >= 32768) { st->reordered++; return; }
        if (d == 1) {
            int64_t spacing = ns - st->last_ns;
            int64_t expected = (int64_t)(uint32_t)(ts - st->last_ts) * 62500 / 3;   /* samples -> ns */
            int64_t dev = spacing - expected;
            if (dev < 0) dev = -dev;
            int64_t b = spacing < 0 ? 0 : spacing / TS_BIN_NS;
            s->spacing_hist[b > TS_BINS ? TS_BINS : b]++;
            b = dev / TS_BIN_NS;
            s->dev_hist[b > TS_BINS ? TS_BINS : b]++;
            if (spacing > s->max_spacing_ns) s->max_spacing_ns = spacing;
            if (dev > s->max_dev_ns) s->max_dev_ns = dev;
            s->spacing_samples++;
        } else {
            st->lost += d - 1;
        }
        st->last_seq = seq; st->last_ts = ts; st->last_ns = ns;
    }

    static void ts_loop(ts_sink *s) {
        struct timespec nap = {0, 100000};
        for (int i = 0; i < TS_VLEN; i++) {
            s->iov[i].iov_base = s->bufs[i];
            s->iov[i].iov_len = TS_BUF;
        }
        while (__atomic_load_n(&s->running, __ATOMIC_ACQUIRE)) {
            if (__atomic_exchange_n(&s->reset, 0, __ATOMIC_ACQ_REL)) ts_clear(s);
            int got = 0;
            for (int f = 0; f < s->nfd; f++) {
                for (;;) {
                    for (int i = 0; i < TS_VLEN; i++) {
                        memset(&s->msgs[i].msg_hdr, 0, sizeof(struct msghdr));
                        s->msgs[i].msg_hdr.msg_iov = &s->iov[i];
                        s->msgs[i].msg_hdr.msg_iovlen = 1;
                        s->msgs[i].msg_hdr.msg_control = s->ctrl[i];
                        s->msgs[i].msg_hdr.msg_controllen = sizeof s->ctrl[i];
                    }
                    int r = recvmmsg(s->fds[f], s->msgs, TS_VLEN, MSG_DONTWAIT, NULL);
                    if (r <= 0) break;
                    s->batches++;
                    got += r;
                    int64_t fallback = 0;
                    for (int i = 0; i < r; i++) {
                        int64_t ns = 0;
                        struct cmsghdr *c;
                        struct msghdr *h = &s->msgs[i].msg_hdr;
                        for (c = CMSG_FIRSTHDR(h); c; c = CMSG_NXTHDR(h, c)) {
                            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
                                struct timespec t;
                                memcpy(&t, CMSG_DATA(c), sizeof t);
                                ns = (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
                            }
                        }
                        if (!ns) { if (!fallback) fallback = ts_realtime_ns(); ns = fallback; }
                        ts_packet(s, s->bufs[i], (int)s->msgs[i].msg_len, ns);
                    }
                    if (r < TS_VLEN) break;
                }
            }
            if (!got) { s->empty_polls++; nanosleep(&nap, NULL); }
        }
    }

    static int64_t ts_hist_quantile(const int64_t *h, int64_t total, double q) {
        if (total <= 0) return -1;
        int64_t want = (int64_t)(q * (double)total);
        if (want >= total) want = total - 1;
        int64_t acc = 0;
        for (int b = 0; b <= TS_BINS; b++) {
            acc += h[b];
            if (acc > want) return (int64_t)b * TS_BIN_NS + TS_BIN_NS / 2;
        }
        return (int64_t)TS_BINS * TS_BIN_NS;
    }
    """
    enum:
        TS_SLOTS
        TS_MAX_FDS
        TS_MAX_TRACE
        TS_TRACE_CAP
    ctypedef struct ts_stream:
        uint32_t ssrc
        int used
        int trace
        int64_t count
        int64_t lost
        int64_t reordered
        int64_t duplicates
        int64_t bytes
    ctypedef struct ts_sink:
        int nfd
        int fds[64]
        ts_stream* slots
        int64_t nstreams
        int64_t overflow_streams
        int64_t spacing_hist[20001]
        int64_t dev_hist[20001]
        int64_t max_spacing_ns
        int64_t max_dev_ns
        int64_t spacing_samples
        int64_t packets
        int64_t bytes
        int64_t non_rtp
        int64_t first_ns
        int64_t last_ns
        int64_t batches
        int64_t empty_polls
        int ntrace
        uint32_t trace_ssrc[64]
        int64_t* trace_ns[64]
        uint16_t* trace_seq[64]
        uint16_t* trace_size[64]
        int trace_len[64]
        int running
        int reset
    void ts_loop(ts_sink* s) nogil
    int64_t ts_hist_quantile(const int64_t* h, int64_t total, double q) nogil
    int64_t ts_realtime_ns() nogil


cdef extern from "stdlib.h" nogil:
    void* calloc(size_t n, size_t size)
    void free(void* p)


cdef class Sink:
    """``nsockets`` UDP sockets on ``host`` drained by one native thread. ``ports`` lists them."""

    cdef ts_sink* _s
    cdef list _socks
    cdef object _thread

    def __cinit__(self, int nsockets=4, str host="127.0.0.1", int rcvbuf=32 << 20):
        import socket

        if not 1 <= nsockets <= TS_MAX_FDS:
            raise ConfigurationError(f"nsockets must be 1..{TS_MAX_FDS}")
        self._s = <ts_sink*>calloc(1, sizeof(ts_sink))
        if self._s == NULL:
            raise MemoryError()
        self._s.slots = <ts_stream*>calloc(TS_SLOTS, sizeof(ts_stream))
        if self._s.slots == NULL:
            raise MemoryError()
        self._socks = []
        for i in range(nsockets):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)       # SO_RCVBUFFORCE (root)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setsockopt(socket.SOL_SOCKET, 35, 1)                # SO_TIMESTAMPNS
            sock.bind((host, 0))
            sock.setblocking(False)
            self._socks.append(sock)
            self._s.fds[i] = sock.fileno()
        self._s.nfd = nsockets

    def __dealloc__(self):
        cdef int i
        if self._s != NULL:
            for i in range(self._s.ntrace):
                free(self._s.trace_ns[i]); free(self._s.trace_seq[i]); free(self._s.trace_size[i])
            free(self._s.slots)
            free(self._s)

    @property
    def ports(self):
        return [s.getsockname()[1] for s in self._socks]

    @property
    def rcvbuf(self):
        import socket
        return self._socks[0].getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    def trace(self, ssrcs):
        """Record every packet's (arrival ns, seq, size) for these SSRCs.

        Applies to streams first seen after the call: call it before traffic starts, or reset().
        """
        for ssrc in ssrcs:
            if self._s.ntrace >= TS_MAX_TRACE:
                raise ConfigurationError(f"at most {TS_MAX_TRACE} traced SSRCs")
            i = self._s.ntrace
            self._s.trace_ssrc[i] = ssrc
            self._s.trace_ns[i] = <int64_t*>calloc(TS_TRACE_CAP, sizeof(int64_t))
            self._s.trace_seq[i] = <uint16_t*>calloc(TS_TRACE_CAP, sizeof(uint16_t))
            self._s.trace_size[i] = <uint16_t*>calloc(TS_TRACE_CAP, sizeof(uint16_t))
            if self._s.trace_ns[i] == NULL or self._s.trace_seq[i] == NULL or self._s.trace_size[i] == NULL:
                raise MemoryError()
            self._s.ntrace += 1

    def start(self):
        if self._thread is not None:
            return
        self._s.running = 1
        self._thread = threading.Thread(target=self._main, name="telecom-sink", daemon=True)
        self._thread.start()

    def _main(self):
        with nogil:
            ts_loop(self._s)

    def stop(self):
        if self._thread is None:
            return
        self._s.running = 0
        self._thread.join()
        self._thread = None

    def reset(self):
        """Forget everything received so far (applied by the receive thread at its next pass)."""
        self._s.reset = 1

    def report(self, bint per_stream=False):
        """Counts, spacing and deviation quantiles (ms), and per-SSRC figures when asked.

        Read while the thread runs: figures are a racy but monotonic snapshot (fine for a report).
        """
        cdef ts_sink* s = self._s
        cdef int i
        cdef ts_stream* st
        cdef int64_t n = s.spacing_samples
        out = {
            "packets": s.packets,
            "bytes": s.bytes,
            "non_rtp": s.non_rtp,
            "streams": s.nstreams,
            "overflow_streams": s.overflow_streams,
            "seconds": (s.last_ns - s.first_ns) / 1e9 if s.packets > 1 else 0.0,
            "spacing_samples": n,
            "spacing_ms": {q: ts_hist_quantile(s.spacing_hist, n, v) / 1e6
                           for q, v in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999))},
            "deviation_ms": {q: ts_hist_quantile(s.dev_hist, n, v) / 1e6
                             for q, v in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999))},
            "batches": s.batches,
            "empty_polls": s.empty_polls,
        }
        out["spacing_ms"]["max"] = s.max_spacing_ns / 1e6
        out["deviation_ms"]["max"] = s.max_dev_ns / 1e6
        lost = reordered = dups = 0
        streams = {}
        for i in range(TS_SLOTS):
            st = &s.slots[i]
            if not st.used:
                continue
            lost += st.lost
            reordered += st.reordered
            dups += st.duplicates
            if per_stream:
                streams[st.ssrc] = st.count
        out["lost"] = lost
        out["reordered"] = reordered
        out["duplicates"] = dups
        if per_stream:
            out["per_stream"] = streams
        traces = {}
        for i in range(s.ntrace):
            traces[s.trace_ssrc[i]] = [(s.trace_ns[i][k], s.trace_seq[i][k], s.trace_size[i][k])
                                       for k in range(s.trace_len[i])]
        out["traces"] = traces
        return out


def realtime_ns():
    """CLOCK_REALTIME in ns: the clock of the kernel arrival stamps (for send-to-arrival latency)."""
    return ts_realtime_ns()


def serve(int nsockets=8):
    """Run a sink as a small line protocol on stdin/stdout (bench/density.py starts it pinned)."""
    sink = Sink(nsockets)
    sink.start()
    print(json.dumps({"ports": sink.ports, "rcvbuf": sink.rcvbuf}), flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "reset":
            sink.reset()
            print(json.dumps({"ok": True}), flush=True)
        elif cmd == "report":
            rep = sink.report(per_stream=arg == "streams")
            rep["per_stream"] = {str(k): v for k, v in rep.get("per_stream", {}).items()}
            rep["traces"] = {str(k): v for k, v in rep["traces"].items()}
            print(json.dumps(rep), flush=True)
        elif cmd == "trace":
            sink.trace([int(x) for x in arg.split()])
            print(json.dumps({"ok": True}), flush=True)
        elif cmd == "quit":
            break
    sink.stop()
