/*
 * A C program using libtelecom the way a C bot would; compiled and run by tests/test_capi.py.
 *
 *   play URL TOKEN CA_FILE USER GUILD CHANNEL SESSION [--file PATH] [--opus PACKETS_FILE]
 *        [--record USER PATH [--mux PATH]]
 *
 * Joins the voice server, plays a 440 Hz tone (-6 dBFS, 2 s) through a PCM pipe with a pause in the
 * middle, then a 660 Hz tone (1.5 s) at client volume 50 % sent from a second thread, optionally a
 * file through create_playable_from_url and a recording of another user (alone, and everyone through
 * the muxer); checks the error paths on
 * the way. Prints one line per fact for the test to check ("check ...", "event ...", "stats ...").
 * Exit status: 0 ok, 2 usage, 3 runtime not loaded, 4 a step failed.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "telecom.h"

#define RATE 48000

static atomic_int callback_events;

static void on_event(const telecom_event *event, void *userdata)
{
    (void)event;
    atomic_fetch_add((atomic_int *)userdata, 1);
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* s16le stereo sine at -6 dBFS peak. */
static uint8_t *tone(double seconds, double freq, size_t *len)
{
    size_t frames = (size_t)(seconds * RATE);
    int16_t *pcm = malloc(frames * 4);
    if (pcm == NULL)
        exit(4);
    for (size_t i = 0; i < frames; i++) {
        int16_t v = (int16_t)lrint(32767.0 * 0.5011872336 * sin(2.0 * M_PI * freq * (double)i / RATE));
        pcm[2 * i] = v;
        pcm[2 * i + 1] = v;
    }
    *len = frames * 4;
    return (uint8_t *)pcm;
}

static void check(const char *what, int status, int expected)
{
    printf("check %s status=%s error=%s\n", what, telecom_status_name(status), telecom_last_error());
    if (status != expected) {
        printf("FAILED %s: expected %s\n", what, telecom_status_name(expected));
        exit(4);
    }
}

static void must(const char *what, int status)
{
    if (status != TELECOM_OK) {
        printf("FAILED %s: %s: %s\n", what, telecom_status_name(status), telecom_last_error());
        exit(4);
    }
}

static void drain_events(client *c)
{
    telecom_event event;
    while (client_poll_event(c, &event) == TELECOM_OK)
        printf("event %s %s\n", event.name, event.json);
}

struct sender {
    playable *pipe;
    int status;
    int other_thread_error_status;
};

/* Sends the second tone from another thread: the ABI is callable from any thread, and the last error
 * is per thread (an error here must not show up in the main thread). */
static void *send_second_tone(void *arg)
{
    struct sender *s = arg;
    size_t len;
    uint8_t *pcm = tone(1.5, 660.0, &len);
    s->other_thread_error_status = playable_set_volume(s->pipe, 999.0);
    s->status = playable_pipe_send_wait(s->pipe, pcm, len, 5000);
    if (s->status == TELECOM_OK)
        s->status = playable_pipe_close(s->pipe);
    free(pcm);
    return NULL;
}

/* Ready Opus packets through an Opus pipe (passthrough: they should reach the wire byte for byte). */
static void play_opus_file(client *c, const char *path)
{
    playable *pipe = create_playable_from_opus_pipe(0);
    if (pipe == NULL) {
        printf("opus status=%s error=%s\n", telecom_status_name(telecom_last_status()), telecom_last_error());
        return;
    }
    check("opus_send_garbage", playable_opus_send(pipe, (const uint8_t *)"", 0), TELECOM_E_INVALID);
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        printf("FAILED cannot open %s\n", path);
        exit(4);
    }
    uint8_t header[2], packet[1276];
    int sent = 0;
    while (fread(header, 1, 2, f) == 2) {
        size_t len = (size_t)header[0] | ((size_t)header[1] << 8);
        if (len > sizeof packet || fread(packet, 1, len, f) != len)
            break;
        int status;
        while ((status = playable_opus_send(pipe, packet, len)) == TELECOM_E_FULL)
            sleep_ms(20);
        must("playable_opus_send", status);
        sent++;
    }
    fclose(f);
    must("client_play_opus", client_play(c, pipe));
    must("playable_pipe_close_opus", playable_pipe_close(pipe));
    must("playable_wait_done_opus", playable_wait_done(pipe, 10000));
    playable_destroy(pipe);
    printf("opus status=TELECOM_OK sent=%d\n", sent);
}

int main(int argc, char **argv)
{
    if (argc < 8) {
        fprintf(stderr, "usage: %s URL TOKEN CA_FILE USER GUILD CHANNEL SESSION [--file PATH] "
                        "[--record USER PATH]\n", argv[0]);
        return 2;
    }
    const char *url = argv[1], *token = argv[2], *ca = argv[3];
    uint64_t user = strtoull(argv[4], NULL, 10), guild = strtoull(argv[5], NULL, 10);
    uint64_t channel = strtoull(argv[6], NULL, 10);
    const char *session = argv[7];
    const char *file = NULL, *record_path = NULL, *mux_path = NULL, *opus_path = NULL;
    uint64_t record_user = 0;
    for (int i = 8; i < argc; i++) {
        if (strcmp(argv[i], "--file") == 0 && i + 1 < argc) {
            file = argv[++i];
        } else if (strcmp(argv[i], "--record") == 0 && i + 2 < argc) {
            record_user = strtoull(argv[++i], NULL, 10);
            record_path = argv[++i];
        } else if (strcmp(argv[i], "--opus") == 0 && i + 1 < argc) {
            opus_path = argv[++i];
        } else if (strcmp(argv[i], "--mux") == 0 && i + 1 < argc) {
            mux_path = argv[++i];
        }
    }

    setvbuf(stdout, NULL, _IOLBF, 0); /* line by line: the test reacts to lines while we run */
    const char *version = telecom_version();
    if (version == NULL) {
        printf("init failed: %s: %s\n", telecom_status_name(telecom_last_status()), telecom_last_error());
        return 3;
    }
    printf("version %s\n", version);

    /* Error paths: NULL session id, stale handles, bad volume, a full pipe. */
    client *bad = create_client(user, guild, NULL);
    check("create_client_null_session", bad == NULL ? telecom_last_status() : TELECOM_OK, TELECOM_E_INVALID);
    check("client_play_null", client_play(NULL, NULL), TELECOM_E_INVALID);

    client *c = create_client_with_channel(user, guild, session, channel);
    if (c == NULL) {
        must("create_client_with_channel", telecom_last_status());
    }
    check("client_set_volume_500", client_set_volume(c, 500.0), TELECOM_E_INVALID);
    check("client_set_server_info_bad_ca", client_set_server_info_ex(c, url, token, "/nonexistent/ca.pem"),
          TELECOM_E_IO);
    atomic_init(&callback_events, 0);
    must("client_set_event_callback", client_set_event_callback(c, on_event, &callback_events));

    must("client_set_server_info_ex", client_set_server_info_ex(c, url, token, ca[0] ? ca : NULL));
    must("client_wait_ready", client_wait_ready(c, 10000));
    printf("ready\n");

    playable *small = create_playable_from_pcm_pipe_ex(100);
    size_t small_len;
    uint8_t *too_much = tone(0.11, 440.0, &small_len);
    check("pipe_send_full", playable_pipe_send(small, too_much, 19200 - 3840), TELECOM_OK);
    check("pipe_send_full", playable_pipe_send(small, too_much, 7680), TELECOM_E_FULL);
    free(too_much);
    playable_destroy(small);
    check("stale_playable", playable_pause(small), TELECOM_E_INVALID);

    /* Tone 1: 440 Hz, 2 s, paused for 0.5 s after 0.6 s. */
    size_t len;
    uint8_t *pcm = tone(2.0, 440.0, &len);
    playable *pipe = create_playable_from_pcm_pipe();
    if (pipe == NULL)
        must("create_playable_from_pcm_pipe", telecom_last_status());
    must("pipe_send", playable_pipe_send(pipe, pcm, len / 2));
    must("client_play", client_play(c, pipe));
    must("pipe_send_wait", playable_pipe_send_wait(pipe, pcm + len / 2, len - len / 2, 5000));
    free(pcm);
    sleep_ms(600);
    must("playable_pause", playable_pause(pipe));
    sleep_ms(500);
    must("playable_resume", playable_resume(pipe));
    must("playable_pipe_close", playable_pipe_close(pipe));
    check("playable_wait_done_short", playable_wait_done(pipe, 1), TELECOM_E_TIMEOUT);
    must("playable_wait_done", playable_wait_done(pipe, 8000));
    playable_destroy(pipe);
    printf("tone1 done\n");

    /* Tone 2: 660 Hz at client volume 50 %, sent from another thread. */
    must("client_set_volume", client_set_volume(c, 50.0));
    playable *pipe2 = create_playable_from_pcm_pipe();
    must("client_play2", client_play(c, pipe2));
    struct sender s = {pipe2, TELECOM_OK, TELECOM_OK};
    pthread_t thread;
    pthread_create(&thread, NULL, send_second_tone, &s);
    pthread_join(thread, NULL);
    check("other_thread_bad_volume", s.other_thread_error_status, TELECOM_E_INVALID);
    /* The other thread's failure is not this thread's: the main thread's last call succeeded. */
    check("thread_local_error", telecom_last_status(), TELECOM_OK);
    must("second tone", s.status);
    must("playable_wait_done2", playable_wait_done(pipe2, 8000));
    playable_destroy(pipe2);
    must("client_set_volume_100", client_set_volume(c, 100.0));
    printf("tone2 done\n");

    if (opus_path != NULL)
        play_opus_file(c, opus_path);

    if (file != NULL) {
        playable *track = create_playable_from_url(file);
        if (track == NULL) {
            printf("from_url status=%s error=%s\n", telecom_status_name(telecom_last_status()),
                   telecom_last_error());
        } else {
            must("client_play_file", client_play(c, track));
            must("playable_wait_done_file", playable_wait_done(track, 15000));
            playable_destroy(track);
            printf("from_url status=TELECOM_OK played\n");
        }
    }

    if (record_path != NULL) {
        int mux_status = mux_path != NULL ? client_set_muxer_file(c, mux_path) : TELECOM_OK;
        if (mux_path != NULL)
            printf("muxer status=%s error=%s\n", telecom_status_name(mux_status), telecom_last_error());
        int status = user_set_output_file(c, record_user, record_path);
        printf("record status=%s error=%s\n", telecom_status_name(status), telecom_last_error());
        if (status == TELECOM_OK) {
            sleep_ms(3000); /* the test makes record_user speak meanwhile */
            must("user_set_output_file_stop", user_set_output_file(c, record_user, NULL));
        }
        if (mux_status == TELECOM_OK && mux_path != NULL)
            must("client_set_muxer_file_stop", client_set_muxer_file(c, NULL));
        printf("recorded\n");
    }

    char stats[4096];
    int n = client_stats_json(c, stats, sizeof stats);
    printf("stats %s\n", n >= 0 && (size_t)n < sizeof stats ? stats : "{}");
    drain_events(c);
    printf("callback_events %d\n", atomic_load(&callback_events));

    client_destroy(c);
    check("stale_client", client_play(c, NULL), TELECOM_E_INVALID);
    if (getenv("TELECOM_TEST_ASAN_CANARY") != NULL) {
        /* A deliberate heap overflow: shows that AddressSanitizer still reports errors in a process
         * that embeds CPython (the test expects this run to fail with a report). */
        char *volatile bytes = malloc(8);
        printf("canary %d\n", bytes[8]);
        free(bytes);
    }
    printf("done\n");
    return 0;
}
