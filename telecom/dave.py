"""DAVE end-to-end encryption for one voice connection: the client state machine over ``davey``.

What it owns: a :class:`DaveSessionManager` per voice session (created on Session Description with
``dave_protocol_version > 0``): the ``davey.DaveSession``, the gateway ops 21–31 (spec §3.3),
the expected user ids from ops 11/13 (plus our own), pending transitions and their passthrough
windows, recovery (op 31 + a new key package) after a commit or welcome that does not apply or after
a sustained run of decrypt failures, and the frame hooks the media engine calls: :meth:`encrypt`
(sending, on a media thread) and :meth:`decrypt` (receiving).

Threading: gateway ops arrive on the io loop; :meth:`encrypt` runs on a media thread with the GIL.
davey's ``DaveSession`` is a PyO3 ``&mut self`` class, so every davey call here goes through one
lock (a concurrent call would raise a borrow error instead of waiting).

What it must not do: touch sockets or the gateway directly (it is handed ``send_json``/
``send_binary`` callables), block, or let a davey exception escape to the io loop: failures become
``dave`` events with ``kind="error"`` and, where the spec says so, a recovery.

Sender key timing: the spec (§3.3 step 7) and libdave switch the *sender* key at op 22, davey
switches it inside ``process_commit``/``process_welcome``. davey has no way to keep encrypting
with the previous epoch's key (no exporter access, no state copy), so telecom follows davey and
discord.py: it encrypts as soon as ``session.ready`` and the protocol version is not 0; see
``docs/protocol-notes.md`` for the consequences and measurements.
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import Any, Callable

from telecom.errors import ConfigurationError
from telecom.protocol import Opcode

log = logging.getLogger("telecom.dave")

try:  # davey is a core dependency; keep the import error readable if it is missing.
    import davey
except ImportError:  # pragma: no cover - exercised only on a broken install
    davey = None  # type: ignore[assignment]

SILENCE_FRAME = b"\xf8\xff\xfe"
#: discord.js' DEFAULT_DECRYPTION_FAILURE_TOLERANCE: DAVE frames in a row that do not decrypt (no
#: transition pending) after which the local MLS state is presumed broken and re-initialised. Unlike
#: discord.js, plain frames refused while passthrough is off do not count (they say nothing about us).
DECRYPT_FAILURE_TOLERANCE = 36
#: Seconds passthrough stays allowed after an upgrade or a downgrade is executed (spec §3.3 step 7:
#: receivers keep old ratchets for up to 10 s).
TRANSITION_EXPIRY = 10
#: Seconds passthrough stays allowed while a downgrade is pending (discord.js uses 24).
DOWNGRADE_PENDING_EXPIRY = 24



def require_davey() -> Any:
    if davey is None:
        raise ConfigurationError("this channel requires DAVE end-to-end encryption and the 'davey' "
                                 "package is not installed (pip install davey)")
    return davey


class DaveSessionManager:
    """DAVE for one voice session. Driven from the io loop; :meth:`encrypt`/:meth:`decrypt` from any thread.

    ``send_json(op, d)`` / ``send_binary(op, payload)`` go to the voice gateway; ``emit(kind, **data)``
    reports to the client (its ``dave`` event); ``on_can_encrypt(bool)`` is called (io loop) when
    outgoing frames start or stop needing encryption, so the client can set or clear the engine hook.
    """

    def __init__(self, user_id: int, channel_id: int, protocol_version: int, *,
                 send_json: Callable[[int, Any], None], send_binary: Callable[[int, bytes], None],
                 emit: Callable[..., None], on_can_encrypt: Callable[[bool], None] | None = None,
                 schedule: Callable[[Callable[[], None]], Any] | None = None) -> None:
        mod = require_davey()
        self.user_id = int(user_id)
        self.channel_id = int(channel_id)
        self._send_json = send_json
        self._send_binary = send_binary
        self._emit = emit
        self._on_can_encrypt = on_can_encrypt
        # How decrypt() (any thread) gets a recovery run on the io loop, e.g. Engine.call_soon.
        self._schedule = schedule
        self._health_check_queued = False
        self._lock = threading.Lock()
        self.protocol_version = int(protocol_version)
        self._session = mod.DaveSession(self.protocol_version, self.user_id, self.channel_id)
        self._external_sender: bytes | None = None
        self._pending: dict[int, int] = {}  # transition id -> protocol version
        self._users: set[int] = set()  # others in the media session (ops 11/13)
        self._last_transition_id = 0
        self._failures_in_row = 0
        self._downgraded = False  # a downgrade (to version 0) was executed and no upgrade since
        self._can_encrypt = False
        self._published_can_encrypt = False  # what on_can_encrypt was last told
        self._epoch: int | None = None
        self._privacy_code: str | None = None
        self.counters = {"encrypted": 0, "encrypt_failures": 0, "plain_sent": 0, "decrypted": 0,
                         "decrypt_failures": 0, "passthrough": 0, "recoveries": 0, "commits": 0,
                         "welcomes": 0, "transitions": 0}
        self._closed = False

    # -- lifecycle (io loop) ----------------------------------------------------------------------

    def start(self) -> None:
        """Send our first key package (op 26), as right after Session Description."""
        self._send_key_package()
        self._emit("session_started", protocol_version=self.protocol_version)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._can_encrypt = False

    def _send_key_package(self) -> None:
        with self._lock:
            package = self._session.get_serialized_key_package()
        self._send_binary(Opcode.DAVE_MLS_KEY_PACKAGE, package)

    def _reinit(self) -> None:
        """Drop the MLS state and start over with a new key package (keeps an op 25 we already have)."""
        version = self.protocol_version or require_davey().DAVE_PROTOCOL_VERSION
        with self._lock:
            self._session.reinit(version, self.user_id, self.channel_id)
            self._can_encrypt = False  # at once: the media thread must not call encrypt_opus (NotReady)
        self._send_key_package()
        self._refresh()

    # -- membership (io loop) -----------------------------------------------------------------------

    def users_connected(self, user_ids: list[int]) -> None:
        self._users.update(int(u) for u in user_ids)

    def user_disconnected(self, user_id: int) -> None:
        self._users.discard(int(user_id))

    def expected_user_ids(self) -> list[int]:
        """Who may be added to the group: everyone op 11 announced and op 13 did not remove, plus us."""
        return sorted(self._users | {self.user_id})

    # -- gateway ops (io loop) ----------------------------------------------------------------------

    def handle(self, op: int, payload: Any) -> None:
        """One DAVE op from the gateway: a JSON ``d`` dict (21–24, 31) or binary payload (25–30)."""
        if self._closed:
            return
        try:
            if op == Opcode.DAVE_MLS_EXTERNAL_SENDER:
                self._on_external_sender(payload)
            elif op == Opcode.DAVE_MLS_PROPOSALS:
                self._on_proposals(payload)
            elif op in (Opcode.DAVE_MLS_ANNOUNCE_COMMIT_TRANSITION, Opcode.DAVE_MLS_WELCOME):
                self._on_commit_or_welcome(op, payload)
            elif op == Opcode.DAVE_PREPARE_TRANSITION:
                self._on_prepare_transition(int(payload["transition_id"]), int(payload["protocol_version"]))
            elif op == Opcode.DAVE_EXECUTE_TRANSITION:
                self._execute(int(payload["transition_id"]))
            elif op == Opcode.DAVE_PREPARE_EPOCH:
                self._on_prepare_epoch(int(payload["epoch"]), int(payload["protocol_version"]))
            else:
                log.debug("DAVE op %s ignored", op)
        except (KeyError, TypeError, ValueError, struct.error) as exc:
            # A malformed message or a davey refusal we have no recovery for: report, keep the call.
            log.warning("DAVE op %s failed: %s", op, exc)
            self._emit("error", op=op, error=str(exc))
        self._refresh()

    def _on_external_sender(self, payload: bytes) -> None:
        self._external_sender = bytes(payload)
        with self._lock:
            status = self._session.status
            if status in (davey.SessionStatus.awaiting_response, davey.SessionStatus.active):
                return  # davey refuses a second one; the group already carries it
            self._session.set_external_sender(self._external_sender)

    def _on_proposals(self, payload: bytes) -> None:
        if not payload:
            raise ValueError("empty proposals payload")
        kind = davey.ProposalsOperationType.append if payload[0] == 0 else davey.ProposalsOperationType.revoke
        with self._lock:
            if self._session.status == davey.SessionStatus.inactive:
                return  # no local group yet (no op 25): proposals are ignored (spec §3.3 step 3)
            result = self._session.process_proposals(kind, bytes(payload[1:]),
                                                     expected_user_ids=self.expected_user_ids())
        if result is not None:
            self._send_binary(Opcode.DAVE_MLS_COMMIT_WELCOME, result.commit + (result.welcome or b""))

    def _on_commit_or_welcome(self, op: int, payload: bytes) -> None:
        if len(payload) < 2:
            raise ValueError(f"op {op} payload too short")
        (tid,) = struct.unpack_from(">H", payload)
        body = bytes(payload[2:])
        try:
            with self._lock:
                if op == Opcode.DAVE_MLS_ANNOUNCE_COMMIT_TRANSITION:
                    self._session.process_commit(body)
                else:
                    self._session.process_welcome(body)
        except ValueError as exc:
            what = "commit" if op == Opcode.DAVE_MLS_ANNOUNCE_COMMIT_TRANSITION else "welcome"
            self._recover(tid, f"{what} failed: {exc}")
            return
        self.counters["commits" if op == Opcode.DAVE_MLS_ANNOUNCE_COMMIT_TRANSITION else "welcomes"] += 1
        self._last_transition_id = tid
        self._failures_in_row = 0
        if self._downgraded:
            # Upgrading: the new group's decryptors start with passthrough off, but peers that have
            # not processed their welcome yet still send plain Opus.
            self._passthrough_window(TRANSITION_EXPIRY)
        if tid != 0:
            self._pending[tid] = self.protocol_version
            self._send_json(Opcode.DAVE_TRANSITION_READY, {"transition_id": tid})
        else:
            self._execute_version(self.protocol_version, 0)

    def _recover(self, transition_id: int, reason: str) -> None:
        """Spec §3.3 steps 4/5: op 31, then a fresh MLS state and a new key package."""
        self.counters["recoveries"] += 1
        log.warning("DAVE: %s; sending op 31 and re-initialising", reason)
        self._emit("invalid_commit", transition_id=transition_id, error=reason)
        self._send_json(Opcode.DAVE_MLS_INVALID_COMMIT_WELCOME, {"transition_id": transition_id})
        self._failures_in_row = 0
        self._reinit()

    def _on_prepare_transition(self, tid: int, version: int) -> None:
        self._pending[tid] = version
        self._emit("transition_prepared", transition_id=tid, protocol_version=version)
        if tid == 0:
            self._execute(0)  # "sole member reset" and other re-initialisations: at once
            return
        if version == 0:
            # Downgrade ahead: accept plain frames from senders that execute before we do (for a
            # bounded time, in case op 22 never comes).
            self._passthrough_window(DOWNGRADE_PENDING_EXPIRY)
        self._send_json(Opcode.DAVE_TRANSITION_READY, {"transition_id": tid})

    def _execute(self, tid: int) -> None:
        version = self._pending.pop(tid, None)
        if version is None:
            log.debug("DAVE: execute for unknown transition %s ignored", tid)
            return
        self._execute_version(version, tid)

    def _execute_version(self, version: int, tid: int) -> None:
        self.protocol_version = version
        self.counters["transitions"] += 1
        if version == 0 and not self._downgraded:
            self._downgraded = True
            with self._lock:
                self._session.set_passthrough_mode(True, None)  # transport-only call from now on
            self._emit("downgraded", transition_id=tid)
        elif version != 0 and self._downgraded and tid != 0:
            # The upgrade's group is in force (op 24 already set the version, as in discord.py).
            self._downgraded = False
            self._passthrough_window(TRANSITION_EXPIRY)
            self._emit("upgraded", transition_id=tid, protocol_version=version)
        self._emit("transition_executed", transition_id=tid, protocol_version=version)

    def _passthrough_window(self, seconds: int) -> None:
        """Accept plain frames for ``seconds`` from now. davey needs both calls: ``(True, _)`` turns
        passthrough on with no end (the expiry is ignored), ``(False, n)`` ends it n seconds later; a
        bare ``(False, n)`` does nothing for decryptors created with passthrough off."""
        with self._lock:
            self._session.set_passthrough_mode(True, None)
            self._session.set_passthrough_mode(False, seconds)

    def _on_prepare_epoch(self, epoch: int, version: int) -> None:
        if epoch != 1:
            # A version change on the existing group (spec §3.3 step 8); v1 is the only version.
            self._emit("prepare_epoch", epoch=epoch, protocol_version=version)
            return
        # A new group is being created (e.g. we are the last member): start over with a new package.
        self.protocol_version = version
        self._pending.clear()
        self._emit("prepare_epoch", epoch=epoch, protocol_version=version)
        self._reinit()

    # -- state reporting ----------------------------------------------------------------------------

    def _refresh(self) -> None:
        """After each op: publish epoch/privacy code changes and whether frames must be encrypted."""
        with self._lock:
            ready = bool(self._session.ready)
            epoch = self._session.epoch
            code = self._session.voice_privacy_code if ready else None
            can = ready and self.protocol_version != 0 and not self._closed
            self._can_encrypt = can
        changed = can != self._published_can_encrypt
        self._published_can_encrypt = can
        if epoch != self._epoch or code != self._privacy_code:
            self._epoch, self._privacy_code = epoch, code
            if ready:
                self._emit("epoch", epoch=epoch, voice_privacy_code=code)
        if changed and self._on_can_encrypt is not None:
            self._on_can_encrypt(can)

    @property
    def can_encrypt(self) -> bool:
        return self._can_encrypt

    @property
    def epoch(self) -> int | None:
        return self._epoch

    @property
    def voice_privacy_code(self) -> str | None:
        return self._privacy_code

    @property
    def status(self) -> str:
        with self._lock:
            return str(self._session.status).rsplit(".", 1)[-1]

    @property
    def pending_transitions(self) -> dict[int, int]:
        return dict(self._pending)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            status = str(self._session.status).rsplit(".", 1)[-1]
            ready = bool(self._session.ready)
        out: dict[str, Any] = {"dave_status": status, "dave_ready": ready, "epoch": self._epoch,
                               "voice_privacy_code": self._privacy_code,
                               "dave_encrypting": self._can_encrypt,
                               "dave_pending_transitions": sorted(self._pending)}
        out.update({f"dave_{k}": v for k, v in self.counters.items()})
        return out

    # -- frame hooks (any thread) --------------------------------------------------------------------

    def encrypt(self, opus: bytes) -> bytes:
        """The engine's frame encryptor: DAVE-encrypt one Opus frame (silence passes unchanged).

        While encryption is not (or no longer) required the frame goes out plain, as discord.py does.
        """
        if opus == SILENCE_FRAME:
            return opus
        with self._lock:
            if not self._can_encrypt:
                self.counters["plain_sent"] += 1
                return opus
            try:
                out = self._session.encrypt_opus(opus)
            except ValueError:
                self.counters["encrypt_failures"] += 1
                raise
            self.counters["encrypted"] += 1
        return out

    def decrypt(self, user_id: int, payload: bytes) -> bytes | None:
        """The receive hook: the Opus frame inside a DAVE frame from ``user_id``, or None if it does not
        decrypt. Plain frames pass while passthrough is allowed (transport-only call, transitions)."""
        if payload == SILENCE_FRAME:
            return payload
        with self._lock:
            protocol_frame = payload.endswith(b"\xfa\xfa")
            if not protocol_frame and (self.protocol_version == 0 or not self._session.ready):
                # Transport-only call, or no group yet: senders send plain Opus (discord.js passes it
                # through while the session is not ready).
                self.counters["passthrough"] += 1
                return payload
            if not self._session.ready:
                self.counters["decrypt_failures"] += 1  # DAVE frames we cannot read before joining
                return None
            try:
                out = self._session.decrypt(int(user_id), davey.MediaType.audio, payload)
            except ValueError:
                out = None
            if out is not None:
                self.counters["decrypted"] += 1
                self._failures_in_row = 0
                return out
            self.counters["decrypt_failures"] += 1
            if protocol_frame:
                # Only DAVE frames we cannot open say our MLS state may be broken; a plain frame means
                # its sender is not encrypting (e.g. re-initialising after its own op 31).
                self._failures_in_row += 1
            trouble = self._failures_in_row >= DECRYPT_FAILURE_TOLERANCE and not self._health_check_queued
            if trouble:
                self._health_check_queued = True
        if trouble:
            if self._schedule is not None:
                self._schedule(self.check_decrypt_health)
            else:
                self.check_decrypt_health()
        return None

    def check_decrypt_health(self) -> None:
        """io loop: after a sustained run of decrypt failures with no transition pending, recover."""
        self._health_check_queued = False
        if self._failures_in_row >= DECRYPT_FAILURE_TOLERANCE and not self._pending and not self._closed:
            self._recover(self._last_transition_id,
                          f"{self._failures_in_row} decrypt failures in a row with no transition pending")
            self._refresh()
