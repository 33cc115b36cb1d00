/* After telecom starts, SIGPIPE is ignored (a websocket closed by the server must not kill the host:
 * the python executable ignores SIGPIPE, an embedding host does not); a host's own handler is kept.
 * Usage: sigpipe [handler] — with "handler", install one before telecom starts. */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include "telecom.h"

static void on_pipe(int sig) { (void)sig; }

int main(int argc, char **argv)
{
    int own = argc > 1 && strcmp(argv[1], "handler") == 0;
    if (own)
        signal(SIGPIPE, on_pipe);
    if (telecom_version() == NULL) {
        printf("init failed: %s\n", telecom_last_error());
        return 1;
    }
    struct sigaction now;
    sigaction(SIGPIPE, NULL, &now);
    if (now.sa_handler == SIG_IGN)
        printf("SIGPIPE ignored\n");
    else if (now.sa_handler == on_pipe)
        printf("SIGPIPE host handler\n");
    else
        printf("SIGPIPE default\n");
    /* and a write to a closed pipe is now an error, not death */
    raise(SIGPIPE);
    printf("alive\n");
    return 0;
}
