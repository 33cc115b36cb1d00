/*
 * What one UDP datagram costs the sending core on this machine, outside telecom: NSOCK connected
 * sockets send a 160-byte datagram each in turn, ROUNDS times, with a 2 ms pause between rounds (as
 * the engine's send phases have). Built and run by bench/bench_udp.py.
 *
 *   udp_send MODE NSOCK ROUNDS BATCH DEST
 *
 * MODE "send": one send() per datagram, as telecom's engine does. MODE "uring": the same sends
 * submitted through io_uring in batches of BATCH with registered files (only when built with
 * -DWITH_URING). MODE "mmsg": what sharing one socket between connections would buy: the NSOCK
 * sockets stay open but idle, and one unconnected socket sends the same datagrams to the same
 * destinations with sendmmsg, BATCH messages per call. DEST "loopback": to a sink in this process that drains 8 sockets with recvmmsg in a
 * busy loop on CPU 1 (the sender is on CPU 0); or an IPv4 address: to its port 9 (discard) through the
 * real interface, nothing received. Prints one JSON line; the first fifth of the rounds is warm-up.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#ifdef WITH_URING
#include <liburing.h>
#endif

#define NSINK 8

static int sinks[NSINK];
static atomic_int stop_sink;
static long received;

static void pin(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof set, &set);
}

static double thread_cpu(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *sink_main(void *arg)
{
    (void)arg;
    pin(1);
    static char bufs[64][256];
    struct mmsghdr msgs[64];
    struct iovec iov[64];
    for (int i = 0; i < 64; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = sizeof bufs[i];
        memset(&msgs[i], 0, sizeof msgs[i]);
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    while (!atomic_load(&stop_sink))
        for (int s = 0; s < NSINK; s++) {
            int got = recvmmsg(sinks[s], msgs, 64, MSG_DONTWAIT, NULL);
            if (got > 0)
                received += got;
        }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 6)
        return 2;
    const char *mode = argv[1], *dest = argv[5];
    int nsock = atoi(argv[2]), rounds = atoi(argv[3]), batch = atoi(argv[4]);
    int loopback = strcmp(dest, "loopback") == 0;
    struct sockaddr_in addr = {.sin_family = AF_INET};
    unsigned short ports[NSINK];
    pthread_t sink;
    if (loopback) {
        addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        for (int s = 0; s < NSINK; s++) {
            int big = 64 << 20;
            socklen_t len = sizeof addr;
            sinks[s] = socket(AF_INET, SOCK_DGRAM, 0);
            setsockopt(sinks[s], SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big);
            addr.sin_port = 0;
            bind(sinks[s], (struct sockaddr *)&addr, sizeof addr);
            getsockname(sinks[s], (struct sockaddr *)&addr, &len);
            ports[s] = addr.sin_port;
        }
    } else if (inet_pton(AF_INET, dest, &addr.sin_addr) != 1) {
        fprintf(stderr, "bad destination %s\n", dest);
        return 2;
    }
    int *fds = malloc(sizeof(int) * nsock);
    for (int i = 0; i < nsock; i++) {
        fds[i] = socket(AF_INET, SOCK_DGRAM, 0);
        addr.sin_port = loopback ? ports[i % NSINK] : htons(9);
        if (fds[i] < 0 || connect(fds[i], (struct sockaddr *)&addr, sizeof addr) != 0) {
            perror("socket/connect");
            return 3;
        }
    }
    int uring = strcmp(mode, "uring") == 0, mmsg = strcmp(mode, "mmsg") == 0;
    int shared = socket(AF_INET, SOCK_DGRAM, 0);
    struct mmsghdr *msgs = calloc(batch, sizeof *msgs);
    struct sockaddr_in *to = calloc(batch, sizeof *to);
    struct iovec one;
    if (shared < 0 || msgs == NULL || to == NULL) {
        perror("shared socket");
        return 3;
    }
    /* one socket carries everyone's datagrams: give it the send buffer the NSOCK sockets have together,
       or a burst finds it full (EAGAIN) where separate sockets would not */
    int sndbuf = 64 << 20;
    setsockopt(shared, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof sndbuf);
#ifdef WITH_URING
    struct io_uring ring;
    if (uring && (io_uring_queue_init(2 * batch, &ring, 0) != 0 || io_uring_register_files(&ring, fds, nsock) != 0)) {
        fprintf(stderr, "io_uring set-up failed\n");
        return 4;
    }
#else
    if (uring) {
        fprintf(stderr, "built without liburing\n");
        return 4;
    }
#endif
    if (loopback)
        pthread_create(&sink, NULL, sink_main, NULL);
    pin(0);
    unsigned char packet[160];
    memset(packet, 0x5a, sizeof packet);
    long sent = 0, errors = 0;
    double cpu0 = 0;
    for (int r = 0; r < rounds; r++) {
        if (r == rounds / 5) {
            cpu0 = thread_cpu();
            sent = errors = 0;
        }
        if (mmsg) {
            one.iov_base = packet;
            one.iov_len = sizeof packet;
            for (int i = 0; i < nsock; i += batch) {
                int k = nsock - i < batch ? nsock - i : batch;
                for (int j = 0; j < k; j++) {
                    to[j] = addr;
                    to[j].sin_port = loopback ? ports[(i + j) % NSINK] : htons(9);
                    msgs[j].msg_hdr.msg_name = &to[j];
                    msgs[j].msg_hdr.msg_namelen = sizeof to[j];
                    msgs[j].msg_hdr.msg_iov = &one;
                    msgs[j].msg_hdr.msg_iovlen = 1;
                }
                int done = sendmmsg(shared, msgs, k, MSG_DONTWAIT | MSG_NOSIGNAL);
                done = done < 0 ? 0 : done;
                sent += done;
                errors += k - done;
            }
        } else if (!uring) {
            for (int i = 0; i < nsock; i++) {
                if (send(fds[i], packet, sizeof packet, MSG_DONTWAIT | MSG_NOSIGNAL) > 0)
                    sent++;
                else
                    errors++;
            }
        }
#ifdef WITH_URING
        else {
            for (int i = 0; i < nsock; i += batch) {
                int k = nsock - i < batch ? nsock - i : batch;
                for (int j = 0; j < k; j++) {
                    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
                    io_uring_prep_send(sqe, i + j, packet, sizeof packet, MSG_DONTWAIT | MSG_NOSIGNAL);
                    sqe->flags |= IOSQE_FIXED_FILE;
                }
                io_uring_submit_and_wait(&ring, k);
                struct io_uring_cqe *cqe;
                unsigned head, seen = 0;
                io_uring_for_each_cqe(&ring, head, cqe) {
                    if (cqe->res > 0)
                        sent++;
                    else
                        errors++;
                    seen++;
                }
                io_uring_cq_advance(&ring, seen);
            }
        }
#endif
        struct timespec pause = {0, 2000000};
        nanosleep(&pause, NULL);
    }
    double cpu = thread_cpu() - cpu0;
    if (loopback) {
        atomic_store(&stop_sink, 1);
        pthread_join(sink, NULL);
    }
    printf("{\"mode\": \"%s\", \"nsock\": %d, \"batch\": %d, \"dest\": \"%s\", \"sent\": %ld, \"errors\": %ld, "
           "\"received\": %ld, \"cpu_us_per_datagram\": %.4f}\n", mode, nsock, uring || mmsg ? batch : 1,
           loopback ? "loopback" : dest, sent, errors, received, cpu / (double)(sent + errors) * 1e6);
    return 0;
}
