/*
 * The seed's example, spelled with its own names (client, playable, create_client, ...), against the
 * local voice server: tests/test_capi.py compiles and runs it.   seed ENDPOINT TOKEN USER GUILD SESSION
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "telecom.h"

int main(int argc, char **argv)
{
    if (argc != 6)
        return 2;
    uint64_t user_id = strtoull(argv[3], NULL, 10), guild_id = strtoull(argv[4], NULL, 10);
    const char *endpoint = argv[1], *token = argv[2], *session_id = argv[5];
    static uint8_t my_pcm_data[48000 * 4]; /* one second of silence */
    memset(my_pcm_data, 0, sizeof my_pcm_data);

    client* client = create_client(user_id, guild_id, session_id);
    client_set_server_info(client, endpoint, token);
    if (client_wait_ready(client, 10000) != TELECOM_OK) {
        printf("not ready: %s %s\n", telecom_status_name(telecom_last_status()), telecom_last_error());
        return 4;
    }
    {
        /* Its own block: in C a variable named `playable` hides the typedef `playable` for the rest of
         * its scope, so the seed's later `playable* pipe` needs the name visible again. */
        playable* playable = create_playable_from_url("https://discordapp.com/tunes.mp3");
        printf("from_url %s %s\n", playable ? "TELECOM_OK" : telecom_status_name(telecom_last_status()),
               telecom_last_error());
        if (playable != NULL) {
            client_play(client, playable);
            playable_pause(playable);
            playable_stop(playable);
            playable_destroy(playable);
        }
    }
    client_set_volume(client, 70);
    playable* pipe = create_playable_from_pcm_pipe();
    client_play(client, pipe);
    int status = playable_pipe_send(pipe, my_pcm_data, sizeof my_pcm_data);
    printf("pipe_send %s\n", telecom_status_name(status));
    playable_stop(pipe);
    playable_destroy(pipe);
    client_destroy(client);
    printf("done\n");
    return status == TELECOM_OK ? 0 : 4;
}
