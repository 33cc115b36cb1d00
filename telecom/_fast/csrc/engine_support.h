/* Small C helpers for the media engine (telecom/_fast/engine.pyx): clocks, absolute sleeps, mutexes,
 * atomics and the event fd. Kept in C because Cython has no portable spelling for GCC atomics,
 * pthread mutexes or clock_nanosleep(TIMER_ABSTIME). Everything here is safe to call without the GIL. */
#ifndef TELECOM_ENGINE_SUPPORT_H
#define TELECOM_ENGINE_SUPPORT_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

typedef pthread_mutex_t tc_mutex;

/* Priority inheritance: a media thread (possibly SCHED_FIFO) waiting for a source or connection lock
 * lends its priority to the Python-side holder, so a busy host cannot park the holder mid-update. */
static inline int tc_mutex_init(tc_mutex *m) {
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setprotocol(&a, PTHREAD_PRIO_INHERIT);
    int r = pthread_mutex_init(m, &a);
    pthread_mutexattr_destroy(&a);
    return r;
}
static inline void tc_mutex_destroy(tc_mutex *m) { pthread_mutex_destroy(m); }
static inline void tc_mutex_lock(tc_mutex *m) { pthread_mutex_lock(m); }
static inline void tc_mutex_unlock(tc_mutex *m) { pthread_mutex_unlock(m); }

static inline int64_t tc_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Sleep until an absolute CLOCK_MONOTONIC deadline (no drift: the schedule is start + n * 20 ms). */
static inline void tc_sleep_until_ns(int64_t deadline) {
    struct timespec ts;
    ts.tv_sec = (time_t)(deadline / 1000000000LL);
    ts.tv_nsec = (long)(deadline % 1000000000LL);
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

/* Default timer slack is 50 us; 1 ns makes the absolute sleeps wake on time (PERFORMANCE.md). */
static inline void tc_set_timer_slack_1ns(void) { prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0); }

static inline int64_t tc_atomic_load64(int64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void tc_atomic_store64(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline int tc_atomic_load_int(int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void tc_atomic_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline int tc_atomic_add_int(int *p, int v) { return __atomic_add_fetch(p, v, __ATOMIC_ACQ_REL); }
static inline void tc_atomic_add64(int64_t *p, int64_t v) { __atomic_add_fetch(p, v, __ATOMIC_ACQ_REL); }
static inline int64_t tc_atomic_take64(int64_t *p) { return __atomic_exchange_n(p, 0, __ATOMIC_ACQ_REL); }

static inline int tc_eventfd(void) { return eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC); }
static inline void tc_eventfd_signal(int fd) {
    uint64_t one = 1;
    ssize_t r = write(fd, &one, sizeof one);
    (void)r; /* EAGAIN means the counter is already non-zero: the reader will wake anyway */
}
static inline void tc_eventfd_drain(int fd) {
    uint64_t v;
    ssize_t r = read(fd, &v, sizeof v);
    (void)r;
}

/* One datagram on a connected UDP socket, never blocking. Returns 0 or errno. */
static inline int tc_send_dgram(int fd, const unsigned char *buf, size_t len) {
    ssize_t r = send(fd, buf, len, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (r < 0) return errno;
    return 0;
}

/* SCHED_FIFO at `priority` for the calling thread (needs CAP_SYS_NICE or an RLIMIT_RTPRIO). 0 or errno. */
static inline int tc_set_realtime(int priority) {
    struct sched_param sp;
    memset(&sp, 0, sizeof sp);
    sp.sched_priority = priority;
    return pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp);
}

/* The same datagram through sendmmsg() with one message: measured against send() by
 * bench/bench_engine.py (each connection owns its socket, so there is nothing else to batch). */
static inline int tc_send_mmsg1(int fd, const unsigned char *buf, size_t len) {
    struct iovec iov;
    struct mmsghdr msg;
    iov.iov_base = (void *)buf;
    iov.iov_len = len;
    memset(&msg, 0, sizeof msg);
    msg.msg_hdr.msg_iov = &iov;
    msg.msg_hdr.msg_iovlen = 1;
    int r = sendmmsg(fd, &msg, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (r < 0) return errno;
    return 0;
}

#endif
