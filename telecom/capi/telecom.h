/*
 * telecom.h — the C ABI of telecom (Discord voice), implemented by libtelecom.so.
 *
 * libtelecom.so embeds the Python runtime (CFFI embedding mode) and runs telecom's own engine, so a C,
 * C++, Rust, Go, ... program gets exactly the Python library's behaviour without knowing Python.
 * Build it with:   python -m telecom.capi.build --out DIR      (writes DIR/libtelecom.so, DIR/telecom.h)
 * Link with:       cc prog.c -IDIR -LDIR -ltelecom -Wl,-rpath,DIR
 *
 * Conventions
 *   - Ids (user, guild, channel) are Discord snowflakes as uint64_t.
 *   - Strings are UTF-8 and NUL-terminated. Strings returned by the library are owned by it (see each
 *     function for how long they stay valid); never free() them.
 *   - Binary buffers are a pointer plus a length in bytes.
 *   - Handles (telecom_client*, telecom_playable*) are opaque. A handle that was destroyed, or was never
 *     returned by the library, is refused with TELECOM_E_INVALID (it is an id, never dereferenced), so
 *     using a stale handle is an error, not a crash.
 *   - Functions returning int return a status: TELECOM_OK (0) or a negative TELECOM_E_* code. Functions
 *     returning a handle or a string return NULL on failure. In both cases telecom_last_status() and
 *     telecom_last_error() describe the failure; both are thread-local and are reset by every call.
 *   - Every function is thread-safe and returns at once, except the *_wait_* functions, which block
 *     the calling thread only (the library's own threads keep sending audio meanwhile).
 *   - PCM is 48 kHz, signed 16-bit little-endian, stereo interleaved (3840 bytes per 20 ms).
 *
 * Where the embedded interpreter finds telecom: the libpython it was built against (its path is
 * baked in as an rpath; PYTHONHOME overrides the standard library's location as for any Python), and
 * the virtual environment it was built from (baked in). Set TELECOM_VENV=/path/to/venv to use another
 * environment that has telecom installed; if that fails, every call fails with TELECOM_E_INIT and
 * telecom_last_error() says why.
 *
 * The seed names are available: `client`, `playable`, create_client(), client_set_server_info(),
 * create_playable_from_url(), client_play(), playable_pause(), playable_stop(), client_set_volume(),
 * create_playable_from_pcm_pipe(), playable_pipe_send(), client_destroy(). Define
 * TELECOM_NO_SHORT_NAMES before including this header to hide the `client` / `playable` typedefs.
 */
#ifndef TELECOM_H
#define TELECOM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes. */
#define TELECOM_OK 0
#define TELECOM_E_INVALID (-1)      /* bad argument, unknown or destroyed handle */
#define TELECOM_E_TIMEOUT (-2)      /* a *_wait_* call ran out of time */
#define TELECOM_E_FULL (-3)         /* a pipe's buffer has no room: nothing was taken, retry later */
#define TELECOM_E_CLOSED (-4)       /* the client or playable is closed / has ended */
#define TELECOM_E_UNSUPPORTED (-5)  /* this build of telecom cannot do that (yet); see the last error */
#define TELECOM_E_CONNECTION (-6)   /* the voice gateway refused or dropped the connection */
#define TELECOM_E_INIT (-7)         /* the embedded runtime or telecom could not be loaded */
#define TELECOM_E_IO (-8)           /* a file could not be read or written */
#define TELECOM_E_EMPTY (-9)        /* client_poll_event: no event waiting */
#define TELECOM_E_INTERNAL (-10)    /* a bug in telecom: the last error has the details */

#define TELECOM_EVENT_NAME_MAX 32
#define TELECOM_EVENT_JSON_MAX 1024

/* BEGIN TELECOM ABI (parsed by telecom/capi/build.py: plain declarations only, no preprocessor) */

typedef struct telecom_client telecom_client;
typedef struct telecom_playable telecom_playable;

/* One event of a client, copied into the caller's memory.
 * name: "ready", "resumed", "disconnect", "error", "speaking_start", "speaking_stop", "user_join",
 *       "user_leave", "track_start", "track_end", "state", "closed" (see docs/capi.md).
 * json: the event's payload as a JSON object, e.g. {"user_id": 123, "ssrc": 7} or
 *       {"playable": 2, "state": "ended"} (playables by handle number) or {"code": 4006, "error": "..."}.
 *       truncated is 1 when the JSON did not fit (it is then cut, not valid JSON).
 * user_id: the user the event is about, 0 when none. */
typedef struct telecom_event {
    char name[32];
    char json[1024];
    uint64_t user_id;
    int truncated;
} telecom_event;

/* Called on telecom's io thread for every event: return quickly, do not block. The event pointer is
 * valid during the call only. */
typedef void (*telecom_event_callback)(const telecom_event *event, void *userdata);

/* The library's version string ("0.1.0"), static. NULL if the runtime could not start. */
const char *telecom_version(void);

/* A client for one bot in one guild, from VOICE_STATE_UPDATE (session id). NULL on failure. */
telecom_client *create_client(uint64_t user_id, uint64_t guild_id, const char *session_id);
/* The same with the voice channel id (the DAVE group id; needed on DAVE channels). */
telecom_client *create_client_with_channel(uint64_t user_id, uint64_t guild_id, const char *session_id,
                                           uint64_t channel_id);
int client_set_channel_id(telecom_client *client, uint64_t channel_id);

/* From VOICE_SERVER_UPDATE: endpoint as Discord sends it ("host:port": wss with certificate
 * verification) or an explicit ws:// / wss:// URL; token. endpoint NULL: the voice server is being
 * reallocated (the connection is dropped until the next call). Connects in the background. */
int client_set_server_info(telecom_client *client, const char *endpoint, const char *token);
/* The same, verifying the server's certificate against ca_file (PEM) instead of the system CAs. */
int client_set_server_info_ex(telecom_client *client, const char *endpoint, const char *token,
                              const char *ca_file);
/* Block until the connection can send audio: TELECOM_OK, TELECOM_E_TIMEOUT, or the connection's error. */
int client_wait_ready(telecom_client *client, int timeout_ms);

/* Start playing (mixed with whatever else this client plays). */
int client_play(telecom_client *client, telecom_playable *playable);
/* Stop everything this client plays. */
int client_stop(telecom_client *client);
/* Client volume in percent, 0..200 (ramped over one 20 ms frame); applied on top of each playable's. */
int client_set_volume(telecom_client *client, double percent);

/* Events: copy the oldest waiting event into *out. TELECOM_OK, or TELECOM_E_EMPTY when none is waiting.
 * Each client keeps the last 1024 events (older ones are dropped and counted in the stats JSON). */
int client_poll_event(telecom_client *client, telecom_event *out);
/* Like client_poll_event, waiting up to timeout_ms: TELECOM_OK or TELECOM_E_TIMEOUT. */
int client_wait_event(telecom_client *client, telecom_event *out, int timeout_ms);
/* Also (or instead) get every event through a callback; NULL removes it. When this call (or
 * client_destroy) returns, the previous callback is not running and will not be called again, so its
 * userdata may be freed (calling this from inside the callback is allowed). */
int client_set_event_callback(telecom_client *client, telecom_event_callback callback, void *userdata);

/* The client's stats as a JSON object into buf (NUL-terminated). Returns the JSON length (excluding
 * the NUL); if that is >= capacity, the JSON was cut: call again with a bigger buffer. */
int client_stats_json(telecom_client *client, char *buf, size_t capacity);

/* Receiving: write what user_id says to a file (format from the extension, e.g. .wav); path NULL stops.
 * TELECOM_E_UNSUPPORTED when this build of telecom has no receive path. */
int user_set_output_file(telecom_client *client, uint64_t user_id, const char *path);
/* Everyone in the channel mixed into one file (the muxer); path NULL stops. */
int client_set_muxer_file(telecom_client *client, const char *path);

/* Disconnect and free the client (its playables stop). The handle is invalid afterwards. */
void client_destroy(telecom_client *client);

/* A playable from an http(s) URL (anything FFmpeg reads), a file:// URL or a local path (then as
 * create_playable_from_file). Only the argument is checked here: fetch and format errors arrive as
 * "track_error" then "track_end" events and end the playable. A missing local file is TELECOM_E_IO at
 * once. NULL + TELECOM_E_UNSUPPORTED when this build has no URL/file sources. */
telecom_playable *create_playable_from_url(const char *url);
/* A playable from a local audio file. */
telecom_playable *create_playable_from_file(const char *path);
/* A pipe you push PCM into (48 kHz s16le stereo); buffers 10 s. */
telecom_playable *create_playable_from_pcm_pipe(void);
/* The same with a buffer of buffer_ms milliseconds (20..600000). */
telecom_playable *create_playable_from_pcm_pipe_ex(int buffer_ms);
/* A pipe you push ready Opus packets into (48 kHz, 20 ms each, 1..1275 bytes, one per call), holding
 * buffer_ms of them (0: 10 s). Packets go to the wire undecoded while the pipe plays alone at 100 %
 * volume; otherwise they are decoded and mixed. NULL + TELECOM_E_UNSUPPORTED without passthrough. */
telecom_playable *create_playable_from_opus_pipe(int buffer_ms);
/* Queue one Opus packet: TELECOM_E_FULL when the queue is full (nothing taken), TELECOM_E_INVALID
 * when it is not one 20 ms Opus packet. */
int playable_opus_send(telecom_playable *pipe, const uint8_t *packet, size_t len);
/* Queue len bytes of PCM (any count). All or nothing: TELECOM_E_FULL when it does not fit now. */
int playable_pipe_send(telecom_playable *pipe, const uint8_t *data, size_t len);
/* Queue len bytes, waiting up to timeout_ms (-1: forever) for room. */
int playable_pipe_send_wait(telecom_playable *pipe, const uint8_t *data, size_t len, int timeout_ms);
/* No more data (PCM or Opus pipe): what is buffered plays out, then the pipe ends. */
int playable_pipe_close(telecom_playable *pipe);

int playable_pause(telecom_playable *playable);
int playable_resume(telecom_playable *playable);
/* Stop now, dropping what is buffered. */
int playable_stop(telecom_playable *playable);
/* Playable volume in percent, 0..200. */
int playable_set_volume(telecom_playable *playable, double percent);
/* Block until the playable has ended (drained or stopped): TELECOM_OK or TELECOM_E_TIMEOUT. */
int playable_wait_done(telecom_playable *playable, int timeout_ms);
/* Stop (if still playing) and free the handle. */
void playable_destroy(telecom_playable *playable);

/* END TELECOM ABI */

/* Implemented in C inside libtelecom (no Python involved; safe to call at any time). */
/* The status of the last call on this thread (TELECOM_OK if it succeeded). */
int telecom_last_status(void);
/* A description of the last failure on this thread ("" after a success). Valid until the next call
 * on this thread. */
const char *telecom_last_error(void);
/* "TELECOM_E_TIMEOUT" for TELECOM_E_TIMEOUT, etc. (static). */
const char *telecom_status_name(int status);

#ifndef TELECOM_NO_SHORT_NAMES
/* The seed's names. */
typedef telecom_client client;
typedef telecom_playable playable;
#endif

#ifdef __cplusplus
}
#endif

#endif /* TELECOM_H */
