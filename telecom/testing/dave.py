"""DAVE on the local voice server: the gateway's role as MLS external sender and transition driver.

Owns :class:`DaveGroups` (plugged into the server as its ``dave_hooks``) and one
:class:`ChannelGroup` per channel: op 25 (the external sender) after Session Description, key
packages (op 26, parsed and signature-checked), Add/Remove proposals (op 27, signed by the external
sender), picking the first valid commit of the epoch from op 28 and routing it (op 29 to members,
op 30 Welcome to the members it adds), transitions (op 23 ready → op 22 execute, or after
``transition_timeout``), sole-member resets (op 24 epoch 1 + op 21 id 0), recovery after op 31,
and protocol downgrade/upgrade (op 21 version 0, op 24 version 1). Spec §3.2–§3.4.

Choices where Discord's behaviour is not documented (spec §3.2 "how the first group forms"):

* A member alone in the channel gets no proposals (it stays pending at epoch 0).
* With no group, every member holding a key package gets Add proposals for the others at epoch 0;
  the first valid commit wins: op 29 to its committer, op 30 to the others.
* In an established group each round sends the same proposals (Removes first, then Adds) to every
  member that stays; the first commit that references exactly those proposals wins. A round that
  a departure makes stale is revoked (op 27 operation 1) before a new one is sent.
* Op 31 marks the member's leaf broken: its next key package is re-added and the broken leaf
  removed in one commit. If no healthy member is left, the group is dissolved and formed anew.

Crypto is :mod:`telecom.testing.mls` (``cryptography`` for ECDSA); nothing from telecom's client.
Runs on the server loop with the server's lock held (the hooks contract in ``faults.py``).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from telecom.testing import mls

if TYPE_CHECKING:  # pragma: no cover
    from telecom.testing.server import LocalVoiceServer
    from telecom.testing.session import VoiceSession

log = logging.getLogger("telecom.testing.dave")

OP_PREPARE_TRANSITION = 21
OP_EXECUTE_TRANSITION = 22
OP_TRANSITION_READY = 23
OP_PREPARE_EPOCH = 24
OP_EXTERNAL_SENDER = 25
OP_KEY_PACKAGE = 26
OP_PROPOSALS = 27
OP_COMMIT_WELCOME = 28
OP_ANNOUNCE_COMMIT = 29
OP_WELCOME = 30
OP_INVALID_COMMIT_WELCOME = 31


@dataclass
class Round:
    """Proposals outstanding in one epoch. ``expected[user]`` = the refs that user's commit must hold."""

    epoch: int
    expected: dict[int, frozenset[bytes]]
    by_ref: dict[bytes, tuple[str, int]]  # ref -> ("add", user) | ("remove", user)
    removes: dict[int, int]  # user -> leaf
    adds: dict[int, mls.KeyPackage]
    initial: bool
    timer: Any = None


@dataclass
class Transition:
    transition_id: int
    kind: str  # "commit", "downgrade"
    awaiting: set[int]
    members: list[int]  # who gets op 22
    epoch: int
    leaves: dict[int, int]
    timer: Any = None


@dataclass
class ChannelGroup:
    channel_id: int
    version: int = 1
    epoch: int = 0  # 0: no established group
    leaves: dict[int, int] = field(default_factory=dict)  # user -> leaf index in the current epoch
    joiners: dict[int, mls.KeyPackage] = field(default_factory=dict)
    broken: set[int] = field(default_factory=set)  # sent op 31: their leaf must go
    gone: set[int] = field(default_factory=set)  # left the channel while in the group
    round: Round | None = None
    transition: Transition | None = None
    next_transition_id: int = 1
    log: list[dict[str, Any]] = field(default_factory=list)  # what happened, for tests

    @property
    def group_id(self) -> bytes:
        return self.channel_id.to_bytes(8, "big")

    def new_transition_id(self) -> int:
        tid = self.next_transition_id
        self.next_transition_id = tid % 0xFFFF + 1  # 1..65535; 0 means "execute at once"
        return tid


class DaveGroups:
    """The DAVE side of :class:`~telecom.testing.LocalVoiceServer` (its ``dave_hooks``).

    ``transition_timeout``: how long a transition waits for op 23 from every member before op 22
    goes out anyway. Fault switches (tests): :meth:`corrupt_next_commit`, and ``announce_delays``
    (user id → seconds): op 29/30 reach that member late, as over a slower link, which shows how many
    frames a receiver cannot decrypt when a sender switches keys before it (davey switches at
    ``process_commit``); ``drop_before`` (user id → opcode): the member's TCP connection is aborted
    right before that op goes out, so it only arrives through the resume replay.
    """

    def __init__(self, server: LocalVoiceServer, transition_timeout: float = 2.0,
                 external_sender: mls.ExternalSender | None = None) -> None:
        self.server = server
        self.transition_timeout = float(transition_timeout)
        self.external_sender = external_sender or mls.ExternalSender()
        self.channels: dict[int, ChannelGroup] = {}
        self.corrupt_commits = 0
        self.announce_delays: dict[int, float] = {}
        self.drop_before: dict[int, int] = {}  # user id -> DAVE opcode: abort its TCP link before sending it
        self.rejected: list[tuple[int, str]] = []  # (user, reason) of refused op 26/28 payloads

    # -- public (thread-safe through the server lock) ------------------------------------------

    def group(self, channel_id: int) -> ChannelGroup:
        group = self.channels.get(channel_id)
        if group is None:
            group = self.channels[channel_id] = ChannelGroup(channel_id)
            group.version = 1 if self.server.channel_dave(channel_id) else 0
        return group

    def snapshot(self, channel_id: int) -> dict[str, Any]:
        """Epoch, leaves and events of a channel's group (a copy)."""
        with self.server._lock:
            g = self.group(channel_id)
            return {"version": g.version, "epoch": g.epoch, "leaves": dict(g.leaves),
                    "joiners": sorted(g.joiners), "transition": g.transition.transition_id
                    if g.transition else None, "log": [dict(e) for e in g.log]}

    def corrupt_next_commit(self, count: int = 1) -> None:
        """Announce the next ``count`` winning commits as garbage in op 29 (the Welcome stays real)."""
        with self.server._lock:
            self.corrupt_commits += count

    def set_protocol_version(self, channel_id: int, version: int) -> None:
        """Downgrade (0) or upgrade (1) the channel: op 21 version 0, or op 24 version 1 then a new group."""
        self.server._call_on_loop(self._set_protocol_version, int(channel_id), int(version))

    # -- helpers --------------------------------------------------------------------------------

    def _members(self, group: ChannelGroup) -> dict[int, VoiceSession]:
        """DAVE sessions in the channel's media session."""
        return {s.user_id: s for s in self.server._media_members(group.channel_id)
                if s.dave_protocol_version > 0}

    def _event(self, group: ChannelGroup, what: str, **data: Any) -> None:
        entry = {"event": what, **data}
        group.log.append(entry)
        log.debug("channel %s: %s", group.channel_id, entry)

    # -- hooks ------------------------------------------------------------------------------------

    def on_identify(self, session: VoiceSession, identify: dict[str, Any]) -> None:
        pass

    def on_session_description(self, session: VoiceSession) -> None:
        if session.dave_protocol_version > 0:
            session.send_binary(OP_EXTERNAL_SENDER, self.external_sender.serialize())

    def on_json(self, session: VoiceSession, op: int, d: Any) -> None:
        group = self.group(session.channel_id)
        if op == OP_TRANSITION_READY and isinstance(d, dict):
            tr = group.transition
            if tr is not None and d.get("transition_id") == tr.transition_id:
                tr.awaiting.discard(session.user_id)
                if not tr.awaiting:
                    self._execute(group)
        elif op == OP_INVALID_COMMIT_WELCOME and isinstance(d, dict):
            self._event(group, "invalid_commit_welcome", user=session.user_id,
                        transition_id=d.get("transition_id"))
            group.broken.add(session.user_id)
            group.joiners.pop(session.user_id, None)
            tr = group.transition
            if tr is not None:
                tr.awaiting.discard(session.user_id)
                if not tr.awaiting:
                    self._execute(group)

    def on_binary(self, session: VoiceSession, opcode: int, payload: bytes) -> None:
        group = self.group(session.channel_id)
        if session.dave_protocol_version <= 0:
            return
        if opcode == OP_KEY_PACKAGE:
            self._on_key_package(group, session, payload)
        elif opcode == OP_COMMIT_WELCOME:
            self._on_commit_welcome(group, session, payload)

    def on_member_leave(self, session: VoiceSession) -> None:
        group = self.group(session.channel_id)
        user = session.user_id
        group.joiners.pop(user, None)
        group.broken.discard(user)
        if user in group.leaves:
            group.gone.add(user)
        rnd = group.round
        if rnd is not None and (user in rnd.expected or user in rnd.adds):
            self._abandon_round(group)
        tr = group.transition
        if tr is not None and user in tr.awaiting:
            tr.awaiting.discard(user)
            if not tr.awaiting:
                self._execute(group)
                return
        self._next_round(group)

    # -- key packages and rounds -----------------------------------------------------------------

    def _on_key_package(self, group: ChannelGroup, session: VoiceSession, payload: bytes) -> None:
        try:
            kp = mls.parse_key_package(payload)
        except mls.MlsDecodeError as exc:
            self.rejected.append((session.user_id, f"key package: {exc}"))
            return
        problems = []
        if not kp.signature_ok:
            problems.append("signature does not verify")
        if kp.user_id != session.user_id:
            problems.append(f"credential identity {kp.leaf_node.identity.hex()} is not the user id")
        if kp.cipher_suite != mls.CIPHERSUITE_P256 or kp.version != mls.MLS10:
            problems.append("wrong version or ciphersuite")
        if kp.leaf_node.lifetime != (0, mls.MAX_LIFETIME):
            problems.append(f"lifetime {kp.leaf_node.lifetime}")
        if problems:
            self.rejected.append((session.user_id, "key package: " + "; ".join(problems)))
            return
        self._event(group, "key_package", user=session.user_id)
        if group.round is not None and session.user_id in group.round.adds:
            self._abandon_round(group)  # a re-init replaced the key package that round adds
        group.joiners[session.user_id] = kp
        self._next_round(group)

    def _next_round(self, group: ChannelGroup) -> None:
        if group.version == 0 or group.round is not None or group.transition is not None:
            return
        members = self._members(group)
        joiners = {u: kp for u, kp in group.joiners.items() if u in members}
        if group.epoch > 0:
            removes = {u: leaf for u, leaf in group.leaves.items()
                       if u in group.gone or u in group.broken or u not in members}
            stay = [u for u in group.leaves if u not in removes]
            if not stay:
                self._event(group, "dissolved", epoch=group.epoch)
                group.epoch, group.leaves = 0, {}
                group.gone.clear()
                group.broken.clear()
            elif len(stay) == 1 and not joiners:
                self._sole_member_reset(group, members[stay[0]])
                return
            elif removes or joiners:
                self._send_round(group, stay, removes, joiners, members)
                return
            else:
                return
        if len(joiners) >= 2:
            self._send_initial_round(group, joiners, members)

    def _send_round(self, group: ChannelGroup, stay: list[int], removes: dict[int, int],
                    joiners: dict[int, mls.KeyPackage], members: dict[int, VoiceSession]) -> None:
        es = self.external_sender
        proposals = []
        by_ref: dict[bytes, tuple[str, int]] = {}
        for user, leaf in sorted(removes.items(), key=lambda x: x[1]):
            p = es.proposal(group.group_id, group.epoch, mls.remove_proposal(leaf))
            proposals.append(p)
            by_ref[p.ref] = ("remove", user)
        for user, kp in joiners.items():
            p = es.proposal(group.group_id, group.epoch, mls.add_proposal(kp.raw))
            proposals.append(p)
            by_ref[p.ref] = ("add", user)
        refs = frozenset(by_ref)
        group.round = Round(group.epoch, {u: refs for u in stay}, by_ref, dict(removes), dict(joiners),
                            initial=False)
        self._arm_round_timer(group)
        payload = mls.append_proposals_payload([p.message for p in proposals])
        for user in stay:
            self._send_late(members[user], OP_PROPOSALS, payload)
        self._event(group, "proposals", epoch=group.epoch, removes=sorted(removes), adds=list(joiners),
                    to=list(stay))

    def _send_initial_round(self, group: ChannelGroup, joiners: dict[int, mls.KeyPackage],
                            members: dict[int, VoiceSession]) -> None:
        es = self.external_sender
        expected: dict[int, frozenset[bytes]] = {}
        by_ref: dict[bytes, tuple[str, int]] = {}
        for user in joiners:
            mine = []
            for other, kp in joiners.items():
                if other == user:
                    continue
                p = es.proposal(group.group_id, 0, mls.add_proposal(kp.raw))
                mine.append(p)
                by_ref[p.ref] = ("add", other)
            expected[user] = frozenset(p.ref for p in mine)
            payload = mls.append_proposals_payload([p.message for p in mine])
            self._send_late(members[user], OP_PROPOSALS, payload)
        group.round = Round(0, expected, by_ref, {}, dict(joiners), initial=True)
        self._arm_round_timer(group)
        self._event(group, "proposals", epoch=0, removes=[], adds=list(joiners), to=list(joiners))

    def _arm_round_timer(self, group: ChannelGroup) -> None:
        # No valid commit in time (every recipient refused the proposals, or its commit was lost):
        # revoke and propose again, rather than leave the channel without a group for good.
        rnd = group.round
        if rnd is not None and self.server._loop is not None:
            rnd.timer = self.server._loop.call_later(
                2 * self.transition_timeout, self._round_timeout, group, rnd)

    def _round_timeout(self, group: ChannelGroup, rnd: Round) -> None:
        with self.server._lock:
            if group.round is rnd:
                self._event(group, "round_timeout", epoch=rnd.epoch)
                self._abandon_round(group)
                self._next_round(group)

    def _abandon_round(self, group: ChannelGroup) -> None:
        rnd, group.round = group.round, None
        if rnd is None:
            return
        if rnd.timer is not None:
            rnd.timer.cancel()
        members = self._members(group)
        for user, refs in rnd.expected.items():
            if user in members and refs:
                self._send_late(members[user], OP_PROPOSALS, mls.revoke_proposals_payload(sorted(refs)))
        self._event(group, "revoked", epoch=rnd.epoch)

    def _sole_member_reset(self, group: ChannelGroup, session: VoiceSession) -> None:
        self._event(group, "sole_member_reset", user=session.user_id, epoch=group.epoch)
        group.epoch, group.leaves = 0, {}
        group.gone.clear()
        group.broken.clear()
        group.joiners.pop(session.user_id, None)  # it sends a fresh key package
        session.send(OP_PREPARE_EPOCH, {"protocol_version": group.version, "epoch": 1})
        session.send(OP_PREPARE_TRANSITION, {"protocol_version": group.version, "transition_id": 0})

    # -- commits and transitions -------------------------------------------------------------------

    def _on_commit_welcome(self, group: ChannelGroup, session: VoiceSession, payload: bytes) -> None:
        rnd = group.round
        user = session.user_id
        if rnd is None or user not in rnd.expected:
            self._event(group, "commit_ignored", user=user, reason="no proposals outstanding for it")
            return
        try:
            commit, welcome = mls.split_commit_welcome(payload)
        except mls.MlsDecodeError as exc:
            self.rejected.append((user, f"commit: {exc}"))
            return
        problem = self._commit_problem(group, rnd, user, commit, welcome)
        if problem:
            self.rejected.append((user, f"commit: {problem}"))
            self._event(group, "commit_rejected", user=user, reason=problem)
            return
        members = self._members(group)
        # New leaves: Removes free their slots first, then each Add (in the commit's order) takes the
        # leftmost free slot (RFC 9420 §12.1.1 / §12.3).
        if rnd.initial:
            leaves = {user: 0}
        else:
            leaves = {u: leaf for u, leaf in group.leaves.items() if u not in rnd.removes}
        adds = [rnd.by_ref[ref][1] for ref in commit.proposal_refs if rnd.by_ref[ref][0] == "add"]
        for added in adds:
            taken = set(leaves.values())
            slot = 0
            while slot in taken:
                slot += 1
            leaves[added] = slot
        tid = group.new_transition_id()
        group.round = None
        if rnd.timer is not None:
            rnd.timer.cancel()
        existing = [u for u in (leaves if not rnd.initial else [user]) if u not in adds]
        announced = commit.raw
        if self.corrupt_commits > 0:
            self.corrupt_commits -= 1
            announced = b"\x00\x01\x00\x01garbage commit"
            self._event(group, "corrupted_commit", transition_id=tid)
        for u in existing:
            if u in members:
                self._send_late(members[u], OP_ANNOUNCE_COMMIT, struct.pack(">H", tid) + announced)
        for u in adds + ([user] if rnd.initial else []):
            group.joiners.pop(u, None)
            group.broken.discard(u)
        for u in adds:
            group.broken.discard(u)
            if u in members:
                body = welcome.raw if welcome else b""
                self._send_late(members[u], OP_WELCOME, struct.pack(">H", tid) + body)
        for u in rnd.removes:
            group.gone.discard(u)
            if u not in adds:
                group.broken.discard(u)
        recipients = [u for u in leaves if u in members]
        group.transition = Transition(tid, "commit", set(recipients), recipients, rnd.epoch + 1, leaves)
        self._event(group, "commit", transition_id=tid, committer=user, epoch=rnd.epoch + 1,
                    leaves=dict(leaves), welcomed=adds)
        self._arm_timer(group)

    def _send_late(self, session: VoiceSession, opcode: int, payload: bytes) -> None:
        """Send an MLS binary op, applying the ``drop_before`` and ``announce_delays`` faults."""
        if self.drop_before.get(session.user_id) == opcode and session.connection is not None:
            # The socket dies just before this message: it is buffered and must come back on resume.
            del self.drop_before[session.user_id]
            session.connection.drop()  # closing: frames from now on are only buffered for the replay
        delay = self.announce_delays.get(session.user_id, 0.0) if opcode != OP_PROPOSALS else 0.0
        if delay <= 0 or self.server._loop is None:
            session.send_binary(opcode, payload)
            return

        def later() -> None:
            with self.server._lock:
                if not session.ended:
                    session.send_binary(opcode, payload)
        self.server._loop.call_later(delay, later)

    def _commit_problem(self, group: ChannelGroup, rnd: Round, user: int, commit: mls.Commit,
                        welcome: mls.Welcome | None) -> str | None:
        if commit.group_id != group.group_id:
            return "wrong group id"
        if commit.epoch != rnd.epoch:
            return f"epoch {commit.epoch}, the group is at {rnd.epoch}"
        if commit.sender_type != mls.SENDER_MEMBER:
            return "not sent by a member"
        if not rnd.initial and group.leaves.get(user) != commit.sender_index:
            return f"sender leaf {commit.sender_index} is not the committer's"
        if commit.inline_proposals:
            return "inline proposals are not allowed"
        if len(set(commit.proposal_refs)) != len(commit.proposal_refs) or \
                frozenset(commit.proposal_refs) != rnd.expected[user]:
            return "does not reference exactly the outstanding proposals"
        adds = [rnd.by_ref[r][1] for r in commit.proposal_refs if rnd.by_ref[r][0] == "add"]
        if adds:
            if welcome is None:
                return "adds members but carries no Welcome"
            wanted = {mls.key_package_ref(rnd.adds[u].raw) for u in adds}
            if not wanted <= set(welcome.new_member_refs):
                return "the Welcome does not cover every added key package"
        if commit.path_leaf is not None and commit.path_leaf.identity != user.to_bytes(8, "big"):
            return "the update path changes the committer's credential"
        return None

    def _arm_timer(self, group: ChannelGroup) -> None:
        tr = group.transition
        assert tr is not None and self.server._loop is not None
        tr.timer = self.server._loop.call_later(self.transition_timeout, self._timeout, group, tr)
        if not tr.awaiting:
            self._execute(group)

    def _timeout(self, group: ChannelGroup, tr: Transition) -> None:
        with self.server._lock:
            if group.transition is tr:
                self._event(group, "transition_timeout", transition_id=tr.transition_id,
                            not_ready=sorted(tr.awaiting))
                self._execute(group)

    def _execute(self, group: ChannelGroup) -> None:
        tr, group.transition = group.transition, None
        if tr is None:
            return
        if tr.timer is not None:
            tr.timer.cancel()
        members = self._members(group) if tr.kind == "commit" else {
            s.user_id: s for s in self.server._media_members(group.channel_id)}
        for u in tr.members:
            if u in members:
                members[u].send(OP_EXECUTE_TRANSITION, {"transition_id": tr.transition_id})
        if tr.kind == "commit":
            group.epoch, group.leaves = tr.epoch, dict(tr.leaves)
        else:  # downgrade: the group is gone, members now send plain Opus
            group.epoch, group.leaves = 0, {}
            group.joiners.clear()
            group.broken.clear()
            group.gone.clear()
            for s in members.values():
                s.dave_protocol_version = 0
        self._event(group, "execute", transition_id=tr.transition_id, kind=tr.kind, epoch=group.epoch)
        self._next_round(group)

    # -- protocol version changes -------------------------------------------------------------------

    def _set_protocol_version(self, channel_id: int, version: int) -> None:
        with self.server._lock:
            # The group first: one created after the reconfiguration would already have the new
            # version, and the change would be skipped (seen when nothing had touched the group yet).
            group = self.group(channel_id)
            self.server.configure_channel(channel_id, dave=bool(version))
            if version == group.version:
                return
            group.version = version
            if group.transition is not None and group.transition.timer is not None:
                group.transition.timer.cancel()
            group.transition = None
            self._abandon_round(group)
            sessions = self.server._media_members(channel_id)
            if version == 0:
                tid = group.new_transition_id()
                users = [s.user_id for s in sessions]
                for s in sessions:
                    s.send(OP_PREPARE_TRANSITION, {"protocol_version": 0, "transition_id": tid})
                group.transition = Transition(tid, "downgrade", set(users), users, 0, {})
                self._event(group, "downgrade", transition_id=tid)
                self._arm_timer(group)
            else:
                group.epoch, group.leaves = 0, {}
                group.joiners.clear()
                group.broken.clear()
                group.gone.clear()
                for s in sessions:
                    if (s.max_dave_protocol_version or 0) >= version:
                        s.dave_protocol_version = version
                        s.send(OP_PREPARE_EPOCH, {"protocol_version": version, "epoch": 1})
                        s.send_binary(OP_EXTERNAL_SENDER, self.external_sender.serialize())
                self._event(group, "upgrade", version=version)
