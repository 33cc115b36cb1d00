/*
 * Thread safety of libtelecom: compiled and run by tests/test_capi.py (also under AddressSanitizer).
 *
 *   threads URL TOKEN USER GUILD CHANNEL SESSION
 *
 * One client; 4 threads each create, play, feed, pause/resume, re-volume, stop and destroy 50 pipes
 * while a fifth thread waits for events. Each thread provokes errors with its own marker and checks
 * that telecom_last_error() shows its own message (the last error is per thread). Prints the counts of
 * track_start / track_end events seen, then "ok".
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "telecom.h"

#define THREADS 4
#define ROUNDS 50

static client *shared;
static atomic_int starts, ends, failures, stop_polling;

static void fail(const char *what, int status)
{
    printf("FAILED %s: %s: %s\n", what, telecom_status_name(status), telecom_last_error());
    atomic_fetch_add(&failures, 1);
}

static void *worker(void *arg)
{
    int id = (int)(intptr_t)arg;
    static const uint8_t silence[7680];
    char marker[32];
    snprintf(marker, sizeof marker, "%d.0", 1000 + id);
    for (int i = 0; i < ROUNDS; i++) {
        playable *p = create_playable_from_pcm_pipe_ex(200);
        if (p == NULL) {
            fail("create", telecom_last_status());
            continue;
        }
        int s;
        if ((s = client_play(shared, p)) != TELECOM_OK)
            fail("play", s);
        if ((s = playable_pipe_send(p, silence, sizeof silence)) != TELECOM_OK)
            fail("send", s);
        if ((s = playable_set_volume(p, (double)(i * 4 % 200))) != TELECOM_OK)
            fail("volume", s);
        if ((s = playable_pause(p)) != TELECOM_OK || (s = playable_resume(p)) != TELECOM_OK)
            fail("pause/resume", s);
        /* An error of our own: the message must be this thread's, whatever the others do meanwhile. */
        s = playable_set_volume(p, 1000.0 + id);
        if (s != TELECOM_E_INVALID || strstr(telecom_last_error(), marker) == NULL) {
            printf("FAILED thread-local error: thread %d got %s \"%s\"\n", id, telecom_status_name(s),
                   telecom_last_error());
            atomic_fetch_add(&failures, 1);
        }
        if ((s = playable_stop(p)) != TELECOM_OK)
            fail("stop", s);
        /* The slot frees when a media thread has seen the stop (the next 20 ms tick): wait for it,
         * or 4 threads cycling this fast would reach the 16-playable limit with stopped tracks. */
        if ((s = playable_wait_done(p, 2000)) != TELECOM_OK)
            fail("wait_done", s);
        playable_destroy(p);
        if ((s = playable_pause(p)) != TELECOM_E_INVALID)
            fail("stale handle accepted", s);
    }
    return NULL;
}

static void *poller(void *arg)
{
    (void)arg;
    telecom_event ev;
    while (!atomic_load(&stop_polling)) {
        if (client_wait_event(shared, &ev, 50) != TELECOM_OK)
            continue;
        if (strcmp(ev.name, "track_start") == 0)
            atomic_fetch_add(&starts, 1);
        else if (strcmp(ev.name, "track_end") == 0)
            atomic_fetch_add(&ends, 1);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 7)
        return 2;
    setvbuf(stdout, NULL, _IOLBF, 0);
    shared = create_client_with_channel(strtoull(argv[3], NULL, 10), strtoull(argv[4], NULL, 10), argv[6],
                                        strtoull(argv[5], NULL, 10));
    if (shared == NULL || client_set_server_info(shared, argv[1], argv[2]) != TELECOM_OK
        || client_wait_ready(shared, 10000) != TELECOM_OK) {
        printf("FAILED join: %s\n", telecom_last_error());
        return 4;
    }
    pthread_t workers[THREADS], poll_thread;
    pthread_create(&poll_thread, NULL, poller, NULL);
    for (int i = 0; i < THREADS; i++)
        pthread_create(&workers[i], NULL, worker, (void *)(intptr_t)i);
    for (int i = 0; i < THREADS; i++)
        pthread_join(workers[i], NULL);
    /* Events arrive asynchronously: wait (up to 10 s) for the last track_end. */
    for (int i = 0; i < 200 && atomic_load(&ends) < THREADS * ROUNDS; i++) {
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    atomic_store(&stop_polling, 1);
    pthread_join(poll_thread, NULL);
    printf("track_start %d\ntrack_end %d\n", atomic_load(&starts), atomic_load(&ends));
    client_destroy(shared);
    if (atomic_load(&failures) != 0)
        return 4;
    printf("ok\n");
    return 0;
}
