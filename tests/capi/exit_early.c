/*
 * A C host that exits with everything still running: compiled and run by tests/test_capi.py.
 *
 *   exit_early URL TOKEN USER GUILD CHANNEL SESSION RECORD_USER RECORD_PATH MEDIA_PATH
 *
 * Joins, records RECORD_USER to RECORD_PATH for 2 s (the test makes that user speak), then starts
 * MEDIA_PATH playing — its decode thread is still loading PyAV — and returns from main without
 * destroying anything. The library's exit hook must stop its threads before exit() unloads libraries
 * under them, and finalise the recording. Exit status: 0 ok, 2 usage, 4 a step failed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "telecom.h"

int main(int argc, char **argv)
{
    if (argc != 10)
        return 2;
    setvbuf(stdout, NULL, _IOLBF, 0);
    uint64_t user = strtoull(argv[3], NULL, 10), guild = strtoull(argv[4], NULL, 10);
    uint64_t channel = strtoull(argv[5], NULL, 10), record_user = strtoull(argv[7], NULL, 10);
    telecom_client *c = create_client_with_channel(user, guild, argv[6], channel);
    if (c == NULL || client_set_server_info(c, argv[1], argv[2]) != TELECOM_OK
        || client_wait_ready(c, 10000) != TELECOM_OK) {
        printf("not ready: %s %s\n", telecom_status_name(telecom_last_status()), telecom_last_error());
        return 4;
    }
    if (user_set_output_file(c, record_user, argv[8]) != TELECOM_OK) {
        printf("record failed: %s\n", telecom_last_error());
        return 4;
    }
    printf("recording\n");
    struct timespec two_seconds = {2, 0};
    nanosleep(&two_seconds, NULL);
    telecom_playable *track = create_playable_from_url(argv[9]);
    if (track == NULL || client_play(c, track) != TELECOM_OK) {
        printf("play failed: %s\n", telecom_last_error());
        return 4;
    }
    printf("exiting\n");
    return 0; /* client, track and recording still live */
}
