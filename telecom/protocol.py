"""Voice gateway v8 vocabulary: opcodes, close codes, speaking flags, and what to do on each close.

This module owns the numbers of the protocol (spec §1.4, §1.8) and nothing else: no I/O, no state.
Names follow the protocol's own words. The gateway (:mod:`telecom.gateway`) and the local voice
server both read these tables, so a number is spelled in exactly one place.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

__all__ = [
    "CLOSE_ACTIONS",
    "CloseCode",
    "Opcode",
    "SpeakingFlags",
    "close_action",
    "describe_close_code",
]


class Opcode(IntEnum):
    """Voice gateway opcodes (spec §1.4). JSON unless noted; 25–30 travel as binary frames."""

    IDENTIFY = 0
    SELECT_PROTOCOL = 1
    READY = 2
    HEARTBEAT = 3
    SESSION_DESCRIPTION = 4
    SPEAKING = 5
    HEARTBEAT_ACK = 6
    RESUME = 7
    HELLO = 8
    RESUMED = 9
    CLIENTS_CONNECT = 11
    # Undocumented / legacy ops seen from servers or in other libraries: tolerated, ignored.
    CLIENT_CONNECT = 12
    CLIENT_DISCONNECT = 13
    SESSION_UPDATE = 14
    MEDIA_SINK_WANTS = 15
    VOICE_BACKEND_VERSION = 16
    CLIENT_FLAGS = 18
    CLIENT_PLATFORM = 20
    # DAVE (end-to-end encryption), spec §3.
    DAVE_PREPARE_TRANSITION = 21
    DAVE_EXECUTE_TRANSITION = 22
    DAVE_TRANSITION_READY = 23
    DAVE_PREPARE_EPOCH = 24
    DAVE_MLS_EXTERNAL_SENDER = 25  # binary
    DAVE_MLS_KEY_PACKAGE = 26  # binary
    DAVE_MLS_PROPOSALS = 27  # binary
    DAVE_MLS_COMMIT_WELCOME = 28  # binary
    DAVE_MLS_ANNOUNCE_COMMIT_TRANSITION = 29  # binary
    DAVE_MLS_WELCOME = 30  # binary
    DAVE_MLS_INVALID_COMMIT_WELCOME = 31


#: The DAVE opcodes (JSON and binary) that the gateway hands to ``on_dave_message``.
DAVE_OPCODES = frozenset(range(21, 32))


class CloseCode(IntEnum):
    """Websocket close codes of the voice gateway (spec §1.8)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    ABNORMAL_CLOSURE = 1006
    UNKNOWN_OPCODE = 4001
    FAILED_TO_DECODE_PAYLOAD = 4002
    NOT_AUTHENTICATED = 4003
    AUTHENTICATION_FAILED = 4004
    ALREADY_AUTHENTICATED = 4005
    SESSION_NO_LONGER_VALID = 4006
    SESSION_TIMEOUT = 4009
    SERVER_NOT_FOUND = 4011
    UNKNOWN_PROTOCOL = 4012
    DISCONNECTED = 4014
    VOICE_SERVER_CRASHED = 4015
    UNKNOWN_ENCRYPTION_MODE = 4016
    E2EE_REQUIRED = 4017
    BAD_REQUEST = 4020
    RATE_LIMITED = 4021
    CALL_TERMINATED = 4022


class SpeakingFlags(IntFlag):
    """The op 5 ``speaking`` bitmask (spec §1.4)."""

    NONE = 0
    MICROPHONE = 1 << 0
    SOUNDSHARE = 1 << 1
    PRIORITY = 1 << 2


# What a client should do on each close code: the spec's recommendation (§1.8), made concrete.
#   "resume"             open a new socket and send op 7; UDP socket, SSRC and key stay valid
#   "reconnect"          new socket + Identify with the same credentials (at most once for bug codes)
#   "wait_server_update" the session ended here; a VOICE_SERVER_UPDATE may follow (move, region change)
#   "new_session"        these credentials are dead; the main gateway must hand out new ones
#   "fatal"              do not reconnect: a bug on our side, or a refusal that retrying cannot fix
CLOSE_ACTIONS: dict[int, str] = {
    CloseCode.NORMAL: "resume",  # Discord sends improper 1000s; only a 1000 *we* asked for ends the session
    CloseCode.GOING_AWAY: "resume",
    CloseCode.ABNORMAL_CLOSURE: "resume",
    CloseCode.UNKNOWN_OPCODE: "reconnect",
    CloseCode.FAILED_TO_DECODE_PAYLOAD: "fatal",
    CloseCode.NOT_AUTHENTICATED: "reconnect",
    CloseCode.AUTHENTICATION_FAILED: "new_session",
    CloseCode.ALREADY_AUTHENTICATED: "fatal",
    CloseCode.SESSION_NO_LONGER_VALID: "new_session",
    CloseCode.SESSION_TIMEOUT: "new_session",
    CloseCode.SERVER_NOT_FOUND: "reconnect",
    CloseCode.UNKNOWN_PROTOCOL: "fatal",
    CloseCode.DISCONNECTED: "wait_server_update",
    CloseCode.VOICE_SERVER_CRASHED: "resume",
    CloseCode.UNKNOWN_ENCRYPTION_MODE: "fatal",
    CloseCode.E2EE_REQUIRED: "fatal",
    CloseCode.BAD_REQUEST: "fatal",
    CloseCode.RATE_LIMITED: "fatal",
    CloseCode.CALL_TERMINATED: "wait_server_update",
}

_MEANINGS: dict[int, str] = {
    CloseCode.NORMAL: "normal closure",
    CloseCode.GOING_AWAY: "going away",
    CloseCode.ABNORMAL_CLOSURE: "connection dropped without a close frame",
    CloseCode.UNKNOWN_OPCODE: "unknown opcode (the client sent an invalid opcode)",
    CloseCode.FAILED_TO_DECODE_PAYLOAD: "failed to decode payload (the client sent an invalid payload)",
    CloseCode.NOT_AUTHENTICATED: "not authenticated (a payload was sent before Identify)",
    CloseCode.AUTHENTICATION_FAILED: "authentication failed (the token in Identify is wrong)",
    CloseCode.ALREADY_AUTHENTICATED: "already authenticated (more than one Identify)",
    CloseCode.SESSION_NO_LONGER_VALID: "session no longer valid; rejoin the channel for a new session",
    CloseCode.SESSION_TIMEOUT: "session timeout; a new session is needed",
    CloseCode.SERVER_NOT_FOUND: "voice server not found",
    CloseCode.UNKNOWN_PROTOCOL: "unknown protocol (Select Protocol named a protocol other than udp)",
    CloseCode.DISCONNECTED: (
        "disconnected (kicked, moved, channel deleted, or the main gateway session dropped)"
    ),
    CloseCode.VOICE_SERVER_CRASHED: "voice server crashed",
    CloseCode.UNKNOWN_ENCRYPTION_MODE: "unknown encryption mode (Select Protocol chose a mode not offered)",
    CloseCode.E2EE_REQUIRED: (
        "E2EE/DAVE protocol required: this call is end-to-end encrypted and the client must "
        "identify with max_dave_protocol_version >= 1 and speak DAVE"
    ),
    CloseCode.BAD_REQUEST: "bad request",
    CloseCode.RATE_LIMITED: "disconnected: rate limited",
    CloseCode.CALL_TERMINATED: "disconnected: call terminated (channel deleted or voice server changed)",
}


def close_action(code: int | None) -> str:
    """The recommended action for a close ``code`` (``None`` = no close frame: a network drop)."""
    if code is None:
        return "resume"
    action = CLOSE_ACTIONS.get(code)
    if action is not None:
        return action
    # Below 4000 is the websocket layer (network, proxies): resumable, like discord.js does.
    # An unknown 4xxx is a refusal we do not understand: try one fresh session, then give up.
    return "resume" if code < 4000 else "reconnect"


def describe_close_code(code: int | None) -> str:
    """``"4017 (E2EE/DAVE protocol required: …)"``: the code with its meaning, for error messages."""
    if code is None:
        return "no close code (connection dropped)"
    meaning = _MEANINGS.get(code)
    if meaning is None:
        meaning = "websocket-level close" if code < 4000 else "unknown voice close code"
    return f"{code} ({meaning})"
