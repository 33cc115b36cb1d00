"""Fault switches of the local voice server, and the placeholder DAVE hooks.

Owns :class:`Faults` (what the server should do wrong on purpose: drop heartbeat ACKs, lose,
reorder or duplicate relayed packets, with a seeded RNG so a failing test replays the same pattern)
and :class:`DaveHooks` (the points where the DAVE external sender will plug into the gateway). It
performs no I/O itself; the gateway and the UDP relay consult it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from telecom.testing.session import VoiceSession


@dataclass
class Faults:
    """Faults to inject. Probabilities are per relayed packet and per receiver (0.0 = never).

    Change fields at any time (from any thread); the server reads them when it needs them.
    ``seed`` feeds the RNG behind the probabilities; setting a new seed restarts the sequence.

    Relay faults (what the SFU does to the packets it forwards): ``relay_loss`` (independent loss),
    ``relay_burst`` (probability that a burst of ``relay_burst_length`` consecutive packets is lost),
    ``relay_reorder`` (a packet is held back and sent after its successor), ``relay_duplicate``
    (sent twice), ``relay_jitter_ms`` (each packet delayed by a uniform random 0..jitter ms, which
    also reorders). ``relay_to``: the user ids of the receivers they apply to (None: everyone).
    """

    drop_heartbeat_acks: bool = False
    relay_loss: float = 0.0
    relay_reorder: float = 0.0
    relay_duplicate: float = 0.0
    relay_burst: float = 0.0
    relay_burst_length: int = 3
    relay_jitter_ms: float = 0.0
    relay_to: set[int] | None = None
    # Users whose UDP path is cut both ways (a NAT rebinding, a dead route): nothing they send is
    # received and nothing is sent to them; the websocket is untouched.
    udp_blackhole: set[int] = field(default_factory=set)
    seed: int = 0
    _rng: random.Random = field(default_factory=random.Random, init=False, repr=False, compare=False)
    _rng_seed: int | None = field(default=None, init=False, repr=False, compare=False)

    def rng(self) -> random.Random:
        if self._rng_seed != self.seed:
            self._rng.seed(self.seed)
            self._rng_seed = self.seed
        return self._rng

    def chance(self, probability: float) -> bool:
        """True with ``probability`` (never touches the RNG when the probability is 0)."""
        if probability <= 0.0:
            return False
        return self.rng().random() < probability

    def applies_to(self, user_id: int) -> bool:
        """Whether relay faults apply to packets sent towards ``user_id``."""
        return self.relay_to is None or user_id in self.relay_to

    def jitter_delay(self) -> float:
        """Seconds to hold one relayed packet back (0.0 without jitter; no RNG use then)."""
        if self.relay_jitter_ms <= 0.0:
            return 0.0
        return self.rng().uniform(0.0, self.relay_jitter_ms) / 1000.0


class DaveHooks:
    """Where the DAVE external sender plugs in. Every method is a no-op here.

    Called on the server's loop with the server's state lock held; a hook may send with
    ``session.send(op, d)`` (JSON, sequenced) and ``session.send_binary(opcode, payload)``
    (binary with the 16-bit sequence prefix). Must not block.
    """

    def on_identify(self, session: VoiceSession, identify: dict[str, Any]) -> None:
        """A member identified (Ready is about to be sent)."""

    def on_session_description(self, session: VoiceSession) -> None:
        """Session Description (op 4) was sent; ``session.dave_protocol_version`` is chosen."""

    def on_json(self, session: VoiceSession, op: int, d: Any) -> None:
        """A JSON op the gateway does not handle itself (e.g. 23 Transition Ready, 31 Invalid Commit)."""

    def on_binary(self, session: VoiceSession, opcode: int, payload: bytes) -> None:
        """A client binary frame (``opcode ‖ payload``), e.g. 26 Key Package or 28 Commit Welcome."""

    def on_member_leave(self, session: VoiceSession) -> None:
        """The member left the media session (op 13 is being sent to the others)."""
