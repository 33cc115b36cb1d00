"""``/openapi.json``: every route of the node described in OpenAPI 3.0, written as a Python dict.

What it owns: the request and response schemas (kept next to each other so a route change shows up
here); the tests run schemathesis against it. What it must not do: drive the app — the handlers in
:mod:`.app` validate on their own; this is the contract they are checked against.
"""

from __future__ import annotations

from typing import Any

SNOWFLAKE = {"type": "string", "pattern": "^[1-9][0-9]{0,18}$", "description": "a Discord snowflake"}
NULLABLE_STR = {"type": "string", "nullable": True}
PERCENT = {"type": "number", "minimum": 0, "maximum": 200}

ERROR = {"type": "object", "required": ["status", "error", "message", "path"], "properties": {
    "timestamp": {"type": "integer"}, "status": {"type": "integer"}, "error": {"type": "string"},
    "message": {"type": "string"}, "path": {"type": "string"}}}

TRACK_SOURCE = {"type": "object", "additionalProperties": False, "properties": {
    "url": {"type": "string", "minLength": 1, "maxLength": 4096, "description": "http(s); URL policy applies"},
    "file": {"type": "string", "minLength": 1, "maxLength": 4096, "description": "relative to the media root"},
    "volume": PERCENT, "position": {"type": "number", "minimum": 0, "maximum": 86400},
    "paused": {"type": "boolean"}, "ahead_seconds": {"type": "number", "minimum": 0.5, "maximum": 60},
    "pcm": {"type": "boolean", "description": "true: a track you push raw PCM into (POST .../pcm)"},
    "opus": {"type": "boolean", "description": "true: a track you push 20 ms Opus packets into (POST .../opus); "
                                               "alone and at 100 % volume they go to the wire as they are"},
    "buffer_seconds": {"type": "number", "minimum": 0.1, "maximum": 60,
                       "description": "PCM and Opus tracks: the buffer (default 10 s)"}}}

TRACK = {"type": "object", "required": ["id", "source", "state", "position", "volume"], "properties": {
    "id": {"type": "string"}, "source": {"type": "object"},
    "state": {"type": "string", "description": "loading, playing, paused, stopped, ended"},
    "position": {"type": "number", "description": "seconds"},
    "duration": {"type": "number", "nullable": True}, "volume": {"type": "number"},
    "frames_played": {"type": "integer"}, "underruns": {"type": "integer"}}}

RECORDING = {"type": "object", "required": ["id", "file", "mix"], "properties": {
    "id": {"type": "string"}, "file": {"type": "string"}, "user_id": NULLABLE_STR, "mix": {"type": "boolean"},
    "started": {"type": "number"}, "stopped": {"type": "number", "nullable": True},
    "frames": {"type": "integer"}}}

VOICE = {"type": "object", "additionalProperties": False, "required": ["session_id", "token", "endpoint"],
         "properties": {"user_id": SNOWFLAKE, "session_id": {"type": "string", "minLength": 1, "maxLength": 256},
                        "channel_id": SNOWFLAKE, "token": {"type": "string", "minLength": 1, "maxLength": 512},
                        "endpoint": {"type": "string", "minLength": 1, "maxLength": 512,
                                     "description": "host:port (wss) or a ws:// / wss:// URL"}}}

PLAYER = {"type": "object", "required": ["guild_id", "state", "volume", "tracks", "recordings"], "properties": {
    "guild_id": {"type": "string"}, "state": {"type": "string"}, "volume": {"type": "number"},
    "voice": {"type": "object"}, "tracks": {"type": "array", "items": TRACK},
    "recordings": {"type": "array", "items": RECORDING},
    "stats": {"type": "object", "nullable": True,
              "description": "the connection's telecom.Client.stats(): frames_sent, late, underruns, ..."}}}

PLAYER_UPDATE = {"type": "object", "additionalProperties": False, "properties": {
    "voice": VOICE, "track": TRACK_SOURCE, "replace": {"type": "boolean", "default": True},
    "stop": {"type": "boolean", "description": "stop every track first"},
    "paused": {"type": "boolean"}, "volume": PERCENT, "position": {"type": "number", "minimum": 0, "maximum": 86400}}}

STATS = {"type": "object", "required": ["players", "playing_players", "frames", "cpu", "memory"], "properties": {
    "players": {"type": "integer"}, "playing_players": {"type": "integer"}, "playing_tracks": {"type": "integer"},
    "sessions": {"type": "integer"}, "uptime": {"type": "number"},
    "cpu": {"type": "object", "properties": {"cores": {"type": "integer"}, "process_load": {"type": "number"}}},
    "memory": {"type": "object", "properties": {"rss": {"type": "integer"}}},
    "frames": {"type": "object", "properties": {k: {"type": "integer"} for k in
                                                ("sent", "late", "deficit", "skipped")}}}}

SESSION = {"type": "object", "required": ["id", "resuming", "timeout"], "properties": {
    "id": {"type": "string"}, "resuming": {"type": "boolean"}, "timeout": {"type": "number"},
    "connected": {"type": "boolean"}, "players": {"type": "integer"}}}


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    texts = {400: "malformed request", 401: "missing or wrong Authorization", 404: "not found",
             409: "conflicts with the current state", 413: "body too large", 422: "invalid field values",
             429: "the buffer is full now: retry later", 500: "node failure"}
    return {str(c): _json({"$ref": "#/components/schemas/Error"}, texts[c]) for c in codes}


def _op(summary: str, responses: dict, *, body: dict | None = None, params: list | None = None,
        errors: tuple = (401, 500)) -> dict:
    op: dict[str, Any] = {"summary": summary, "responses": {**responses, **_errors(*errors)}}
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": False, "content": {"application/json": {"schema": body}}}
    return op


def _path(name: str, schema: dict) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": schema}


SID = _path("sid", {"type": "string", "minLength": 1, "maxLength": 64})
GID = _path("guild_id", SNOWFLAKE)
TID = _path("track_id", {"type": "string", "minLength": 1, "maxLength": 40})
RID = _path("rid", {"type": "string", "minLength": 1, "maxLength": 40})
BODY_ERRORS = (400, 401, 404, 409, 413, 422, 500)


def spec() -> dict:
    v = "/v1"
    return {
        "openapi": "3.0.3",
        "info": {"title": "telecom-server", "version": "0.1.0",
                 "description": "Discord voice node: sessions, players, tracks, recordings (see docs/http-api.md)."},
        "servers": [{"url": "/"}],
        "security": [{"password": []}],
        "components": {
            "securitySchemes": {"password": {"type": "apiKey", "in": "header", "name": "Authorization"}},
            "schemas": {"Error": ERROR, "Track": TRACK, "Player": PLAYER, "Recording": RECORDING,
                        "Stats": STATS, "Session": SESSION},
        },
        "paths": {
            f"{v}/info": {"get": _op("Node version, sources, URL policy, engine options", {"200": _json({
                "type": "object", "required": ["version", "api", "engine"],
                "properties": {"version": {"type": "string"}, "api": {"type": "string"}, "engine": {
                    "type": "object",
                    "required": ["running", "media_threads", "realtime_priority", "work_ahead", "rebalance"],
                    "properties": {"running": {"type": "boolean"}, "media_threads": {"type": "integer"},
                                   "realtime_priority": {"type": "integer"},
                                   "work_ahead": {"type": "boolean"}, "rebalance": {"type": "boolean"}}}}})})},
            f"{v}/stats": {"get": _op("Node stats (players, frames, CPU, memory)",
                                      {"200": _json({"$ref": "#/components/schemas/Stats"})})},
            f"{v}/websocket": {"get": _op(
                "Events websocket (Upgrade). Headers: User-Id (optional), Session-Id (resume)",
                {"101": {"description": "switching protocols"}}, errors=(400, 401, 500))},
            f"{v}/sessions/{{sid}}": {
                "get": _op("A session", {"200": _json({"$ref": "#/components/schemas/Session"})},
                           params=[SID], errors=(401, 404, 500)),
                "patch": _op("Resuming configuration", {"200": _json({
                    "type": "object", "required": ["resuming", "timeout"],
                    "properties": {"resuming": {"type": "boolean"}, "timeout": {"type": "number"}}})},
                    params=[SID], errors=BODY_ERRORS, body={
                        "type": "object", "additionalProperties": False, "properties": {
                            "resuming": {"type": "boolean"},
                            "timeout": {"type": "number", "minimum": 1, "maximum": 86400}}}),
            },
            f"{v}/sessions/{{sid}}/players": {"get": _op(
                "The session's players", {"200": _json({"type": "array", "items": {"$ref": "#/components/schemas/Player"}})},
                params=[SID], errors=(401, 404, 500))},
            f"{v}/sessions/{{sid}}/players/{{guild_id}}": {
                "get": _op("A player's state", {"200": _json({"$ref": "#/components/schemas/Player"})},
                           params=[SID, GID], errors=(400, 401, 404, 500)),
                "patch": _op("Create/update a player: voice (a new endpoint/token is a move), stop, track "
                             "(replace defaults to true), paused, volume, position",
                             {"200": _json({"$ref": "#/components/schemas/Player"})},
                             params=[SID, GID], body=PLAYER_UPDATE, errors=BODY_ERRORS),
                "delete": _op("Disconnect and remove the player", {"204": {"description": "removed"}},
                              params=[SID, GID], errors=(400, 401, 404, 500)),
            },
            f"{v}/sessions/{{sid}}/players/{{guild_id}}/tracks": {"post": _op(
                "Play a track (mixed with the others unless replace)",
                {"201": _json({"$ref": "#/components/schemas/Track"}, "playing")}, params=[SID, GID],
                body={**TRACK_SOURCE, "properties": {**TRACK_SOURCE["properties"], "replace": {"type": "boolean"}}},
                errors=BODY_ERRORS)},
            f"{v}/sessions/{{sid}}/players/{{guild_id}}/tracks/{{track_id}}": {
                "get": _op("A track", {"200": _json({"$ref": "#/components/schemas/Track"})},
                           params=[SID, GID, TID], errors=(400, 401, 404, 500)),
                "patch": _op("Pause/resume, volume, seek", {"200": _json({"$ref": "#/components/schemas/Track"})},
                             params=[SID, GID, TID], errors=BODY_ERRORS, body={
                                 "type": "object", "additionalProperties": False, "properties": {
                                     "paused": {"type": "boolean"}, "volume": PERCENT,
                                     "position": {"type": "number", "minimum": 0, "maximum": 86400}}}),
                "delete": _op("Stop the track", {"204": {"description": "stopped"}},
                              params=[SID, GID, TID], errors=(400, 401, 404, 500)),
            },
            f"{v}/sessions/{{sid}}/players/{{guild_id}}/tracks/{{track_id}}/pcm": {"post": {
                **_op("Queue raw PCM (48 kHz s16le stereo, a multiple of 4 bytes, at most the node's body "
                      "limit) into a PCM track: all or nothing; 429 when it does not fit now",
                      {"200": _json({"type": "object", "required": ["buffered", "capacity"], "properties": {
                          "buffered": {"type": "integer"}, "capacity": {"type": "integer"}}})},
                      params=[SID, GID, TID], errors=(400, 401, 404, 409, 413, 422, 429, 500)),
                "requestBody": {"required": True, "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}},
            f"{v}/sessions/{{sid}}/players/{{guild_id}}/tracks/{{track_id}}/opus": {"post": {
                **_op("Queue 20 ms Opus packets (48 kHz), each preceded by its length as 2 bytes big-endian "
                      "(1..1275), into an Opus track: all or nothing; 429 when they do not fit now, 422 for "
                      "bad framing or a packet that is not one 20 ms Opus frame",
                      {"200": _json({"type": "object", "required": ["queued", "buffered", "capacity"],
                                     "properties": {"queued": {"type": "integer"},
                                                    "buffered": {"type": "integer", "description": "packets"},
                                                    "capacity": {"type": "integer", "description": "packets"}}})},
                      params=[SID, GID, TID], errors=(400, 401, 404, 409, 413, 422, 429, 500)),
                "requestBody": {"required": True, "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}},
            f"{v}/sessions/{{sid}}/players/{{guild_id}}/tracks/{{track_id}}/end": {"post": _op(
                "No more PCM or packets: what is buffered plays out, then the track ends",
                {"204": {"description": "input closed"}}, params=[SID, GID, TID],
                errors=(400, 401, 404, 409, 500))},
            f"{v}/sessions/{{sid}}/players/{{guild_id}}/recordings": {"post": _op(
                "Record one user (user_id) or the whole channel (mix) to a file in the recordings dir",
                {"201": _json({"$ref": "#/components/schemas/Recording"}, "recording")}, params=[SID, GID],
                errors=BODY_ERRORS, body={"type": "object", "additionalProperties": False, "properties": {
                    "user_id": SNOWFLAKE, "mix": {"type": "boolean"},
                    "format": {"type": "string", "enum": ["wav", "flac", "ogg", "opus", "mp3"]}}})},
            f"{v}/sessions/{{sid}}/players/{{guild_id}}/recordings/{{rid}}": {"delete": _op(
                "Stop a recording (the file is finalised)", {"200": _json({"$ref": "#/components/schemas/Recording"})},
                params=[SID, GID, RID], errors=(400, 401, 404, 500))},
            f"{v}/recordings": {"get": _op("Files in the recordings dir", {"200": _json({
                "type": "array", "items": {"type": "object", "required": ["file", "bytes"], "properties": {
                    "file": {"type": "string"}, "bytes": {"type": "integer"}, "modified": {"type": "number"},
                    "recording": {"type": "boolean"}}}})})},
            f"{v}/recordings/{{name}}": {"get": _op(
                "Download a recording", {"200": {"description": "the file", "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
                params=[_path("name", {"type": "string", "minLength": 1, "maxLength": 200})],
                errors=(400, 401, 404, 500))},
            "/metrics": {"get": _op("Prometheus text exposition", {"200": {"description": "metrics", "content": {
                "text/plain": {"schema": {"type": "string"}}}}})},
            "/openapi.json": {"get": {"summary": "This document", "security": [],
                                      "responses": {"200": _json({"type": "object"})}}},
        },
    }
