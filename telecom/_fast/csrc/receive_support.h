/* Small C helpers for the native receive loop (telecom/_fast/receive.pyx): epoll, a periodic timerfd
 * for the 20 ms playout tick, recvmmsg into a fixed packet array, and a condition variable for the
 * bounded batch queue the Python output worker drains. Kept in C because Cython has no convenient
 * spelling for struct mmsghdr/iovec set-up or pthread_cond_timedwait on CLOCK_MONOTONIC.
 * Everything here is safe to call without the GIL. */
#ifndef TELECOM_RECEIVE_SUPPORT_H
#define TELECOM_RECEIVE_SUPPORT_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define TC_RX_BATCH 64
#define TC_RX_PACKET 2048

#define TC_RX_CMSG 64 /* room for one SCM_TIMESTAMPNS (CMSG_SPACE(16) = 32 on 64-bit) */

typedef struct {
    struct mmsghdr msgs[TC_RX_BATCH];
    struct iovec iov[TC_RX_BATCH];
    unsigned char buf[TC_RX_BATCH][TC_RX_PACKET];
    unsigned char ctl[TC_RX_BATCH][TC_RX_CMSG];
} tc_rx_batch;

static inline void tc_rx_batch_init(tc_rx_batch *b) {
    int i;
    memset(b->msgs, 0, sizeof b->msgs);
    for (i = 0; i < TC_RX_BATCH; i++) {
        b->iov[i].iov_base = b->buf[i];
        b->iov[i].iov_len = TC_RX_PACKET;
        b->msgs[i].msg_hdr.msg_iov = &b->iov[i];
        b->msgs[i].msg_hdr.msg_iovlen = 1;
    }
}

/* Kernel receive timestamps (SCM_TIMESTAMPNS, CLOCK_REALTIME): a packet's arrival time must not
 * depend on when the receive thread got the CPU. Returns 0 or errno. */
static inline int tc_enable_rx_timestamps(int fd) {
    int one = 1;
    return setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one) == 0 ? 0 : errno;
}

/* Up to TC_RX_BATCH datagrams without blocking. Returns the count (0 when none), or -errno. */
static inline int tc_rx_recv(int fd, tc_rx_batch *b) {
    int i, n;
    for (i = 0; i < TC_RX_BATCH; i++) {
        b->msgs[i].msg_len = 0;
        b->msgs[i].msg_hdr.msg_control = b->ctl[i];
        b->msgs[i].msg_hdr.msg_controllen = TC_RX_CMSG;
        b->msgs[i].msg_hdr.msg_flags = 0;
    }
    n = recvmmsg(fd, b->msgs, TC_RX_BATCH, MSG_DONTWAIT, NULL);
    if (n < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -errno;
    return n;
}

/* The kernel's CLOCK_REALTIME arrival time of datagram i in ns, or 0 if the socket gave none. */
static inline int64_t tc_rx_stamp_ns(tc_rx_batch *b, int i) {
    struct msghdr *h = &b->msgs[i].msg_hdr;
    struct cmsghdr *c;
    for (c = CMSG_FIRSTHDR(h); c != NULL; c = CMSG_NXTHDR(h, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
            struct timespec ts;
            memcpy(&ts, CMSG_DATA(c), sizeof ts);
            return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
        }
    }
    return 0;
}

/* CLOCK_REALTIME - CLOCK_MONOTONIC now, in ns (to move kernel stamps onto the arrival clock). */
static inline int64_t tc_realtime_offset_ns(void) {
    struct timespec r, m;
    clock_gettime(CLOCK_MONOTONIC, &m);
    clock_gettime(CLOCK_REALTIME, &r);
    return ((int64_t)r.tv_sec - (int64_t)m.tv_sec) * 1000000000LL + (r.tv_nsec - m.tv_nsec);
}
static inline unsigned char *tc_rx_data(tc_rx_batch *b, int i) { return b->buf[i]; }
static inline int tc_rx_len(tc_rx_batch *b, int i) {
    /* a datagram longer than the buffer was truncated: report it as oversized */
    if (b->msgs[i].msg_hdr.msg_flags & MSG_TRUNC) return -1;
    return (int)b->msgs[i].msg_len;
}

static inline int tc_epoll_create(void) { return epoll_create1(EPOLL_CLOEXEC); }
static inline int tc_epoll_add(int ep, int fd, uint64_t tag) {
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN;
    ev.data.u64 = tag;
    return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) == 0 ? 0 : errno;
}
static inline int tc_epoll_del(int ep, int fd) {
    struct epoll_event ev;
    return epoll_ctl(ep, EPOLL_CTL_DEL, fd, &ev) == 0 ? 0 : errno;
}
/* Waits up to timeout_ms; fills tags[0..n) and returns n (0 on timeout or EINTR). */
static inline int tc_epoll_wait(int ep, uint64_t *tags, int max, int timeout_ms) {
    struct epoll_event evs[64];
    int i, n;
    if (max > 64) max = 64;
    n = epoll_wait(ep, evs, max, timeout_ms);
    if (n < 0) return 0;
    for (i = 0; i < n; i++) tags[i] = evs[i].data.u64;
    return n;
}

/* A periodic CLOCK_MONOTONIC timer; reading it returns the expirations since the last read. */
static inline int tc_timerfd_periodic(int64_t period_ns) {
    struct itimerspec its;
    int fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (fd < 0) return -1;
    its.it_interval.tv_sec = (time_t)(period_ns / 1000000000LL);
    its.it_interval.tv_nsec = (long)(period_ns % 1000000000LL);
    its.it_value = its.it_interval;
    if (timerfd_settime(fd, 0, &its, NULL) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}
static inline uint64_t tc_timerfd_read(int fd) {
    uint64_t n = 0;
    if (read(fd, &n, sizeof n) != (ssize_t)sizeof n) return 0;
    return n;
}

typedef struct {
    pthread_cond_t cond;
} tc_cond;
static inline int tc_cond_init(tc_cond *c) {
    pthread_condattr_t a;
    int r;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    r = pthread_cond_init(&c->cond, &a);
    pthread_condattr_destroy(&a);
    return r;
}
static inline void tc_cond_destroy(tc_cond *c) { pthread_cond_destroy(&c->cond); }
static inline void tc_cond_signal(tc_cond *c) { pthread_cond_signal(&c->cond); }
static inline void tc_cond_broadcast(tc_cond *c) { pthread_cond_broadcast(&c->cond); }
/* Wait on c with m held, until the absolute CLOCK_MONOTONIC deadline (ns). */
static inline void tc_cond_wait_until(tc_cond *c, pthread_mutex_t *m, int64_t deadline_ns) {
    struct timespec ts;
    ts.tv_sec = (time_t)(deadline_ns / 1000000000LL);
    ts.tv_nsec = (long)(deadline_ns % 1000000000LL);
    pthread_cond_timedwait(&c->cond, m, &ts);
}

#endif
