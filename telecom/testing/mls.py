"""The small part of MLS (RFC 9420) a DAVE voice gateway needs, written for the local voice server.

Owns the TLS-presentation codec (RFC 9420 §2.1: big-endian integers, variable-length vectors with
the MLS varint header), the voice gateway's **external sender** (spec §3.4: a P-256 signing key and
a basic credential; ECDSA through ``cryptography``), external Add/Remove proposals signed over a
``FramedContentTBS`` without GroupContext (RFC 9420 §6.1, spec §5), proposal references (§5.2),
and parsers that walk a KeyPackage, a commit ``MLSMessage`` and a ``Welcome`` far enough to
validate them and to split op 28's ``MLSMessage(commit) ‖ Welcome``.

What it must not do: import telecom's client code (the server checks it), or keep group state:
it does not know the tree, the key schedule or any secret. The server in
:mod:`telecom.testing.dave` decides membership; this module only reads and writes bytes.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

MLS10 = 1
CIPHERSUITE_P256 = 2  # MLS_128_DHKEMP256_AES128GCM_SHA256_P256
CREDENTIAL_BASIC = 1

WIRE_PUBLIC_MESSAGE = 1
WIRE_PRIVATE_MESSAGE = 2
WIRE_WELCOME = 3

SENDER_MEMBER = 1
SENDER_EXTERNAL = 2
SENDER_NEW_MEMBER_PROPOSAL = 3
SENDER_NEW_MEMBER_COMMIT = 4

CONTENT_APPLICATION = 1
CONTENT_PROPOSAL = 2
CONTENT_COMMIT = 3

PROPOSAL_ADD = 1
PROPOSAL_UPDATE = 2
PROPOSAL_REMOVE = 3

LEAF_SOURCE_KEY_PACKAGE = 1
LEAF_SOURCE_UPDATE = 2
LEAF_SOURCE_COMMIT = 3

PROPOSAL_OR_REF_PROPOSAL = 1
PROPOSAL_OR_REF_REFERENCE = 2

MAX_LIFETIME = (1 << 64) - 1


class MlsDecodeError(ValueError):
    """Bytes that are not the MLS structure they should be (truncated, bad lengths, wrong tags)."""


# -- TLS presentation language ---------------------------------------------------------------------

def varint(n: int) -> bytes:
    """RFC 9420 §2.1.2 variable-length integer (the length header of every ``<V>`` vector)."""
    if n < 1 << 6:
        return bytes((n,))
    if n < 1 << 14:
        return struct.pack(">H", 0x4000 | n)
    if n < 1 << 30:
        return struct.pack(">I", 0x80000000 | n)
    raise ValueError("vector too long for an MLS varint")


def opaque(data: bytes) -> bytes:
    """``opaque x<V>``: varint length, then the bytes."""
    return varint(len(data)) + bytes(data)


class Reader:
    """A cursor over TLS-encoded bytes; every read checks bounds and raises :class:`MlsDecodeError`."""

    def __init__(self, data: bytes, offset: int = 0, end: int | None = None) -> None:
        self.data = bytes(data)
        self.pos = offset
        self.end = len(self.data) if end is None else end

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise MlsDecodeError(
                f"truncated: need {n} bytes at offset {self.pos}, have {self.end - self.pos}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self._take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self._take(4))[0]

    def u64(self) -> int:
        return struct.unpack(">Q", self._take(8))[0]

    def varint(self) -> int:
        first = self._take(1)[0]
        prefix = first >> 6
        if prefix == 0:
            return first & 0x3F
        if prefix == 1:
            value = ((first & 0x3F) << 8) | self._take(1)[0]
            if value < 1 << 6:
                raise MlsDecodeError("varint not in minimal encoding")
            return value
        if prefix == 2:
            rest = self._take(3)
            value = ((first & 0x3F) << 24) | int.from_bytes(rest, "big")
            if value < 1 << 14:
                raise MlsDecodeError("varint not in minimal encoding")
            return value
        raise MlsDecodeError("invalid varint prefix 0b11")

    def opaque(self) -> bytes:
        return self._take(self.varint())

    def vector(self) -> "Reader":
        """A sub-reader over one ``<V>`` vector's body (this reader skips past it)."""
        n = self.varint()
        start = self.pos
        self._take(n)
        return Reader(self.data, start, start + n)

    @property
    def done(self) -> bool:
        return self.pos >= self.end

    def expect_done(self, what: str) -> None:
        if self.pos != self.end:
            raise MlsDecodeError(f"{self.end - self.pos} trailing bytes after {what}")


# -- signatures -----------------------------------------------------------------------------------

def sign_content(label: str, content: bytes) -> bytes:
    """``SignContent`` of RFC 9420 §5.1.2: what SignWithLabel actually signs."""
    return opaque(b"MLS 1.0 " + label.encode()) + opaque(content)


def verify_with_label(public_key: bytes, label: str, content: bytes, signature: bytes) -> bool:
    """ECDSA P-256/SHA-256 (DER) VerifyWithLabel; ``public_key`` is the uncompressed SEC1 point."""
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public_key)
        key.verify(signature, sign_content(label, content), ec.ECDSA(hashes.SHA256()))
        return True
    except (InvalidSignature, ValueError):
        return False


def ref_hash(label: str, value: bytes) -> bytes:
    """RFC 9420 §5.2 RefHash with SHA-256 (ciphersuite 2)."""
    return hashlib.sha256(opaque(label.encode()) + opaque(value)).digest()


# -- the external sender --------------------------------------------------------------------------

class ExternalSender:
    """The voice gateway as MLS external sender: a P-256 key and a basic credential.

    ``identity`` defaults to one zero byte, as davey's vector (spec §3.4) has it.
    """

    def __init__(self, private_key: ec.EllipticCurvePrivateKey | None = None,
                 identity: bytes = b"\x00") -> None:
        self._key = private_key if private_key is not None else ec.generate_private_key(ec.SECP256R1())
        self.identity = bytes(identity)
        self.public_key = self._key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)

    def serialize(self) -> bytes:
        """The op 25 payload: ``ExternalSender { signature_key<V>; Credential }``."""
        return opaque(self.public_key) + struct.pack(">H", CREDENTIAL_BASIC) + opaque(self.identity)

    def sign_with_label(self, label: str, content: bytes) -> bytes:
        return self._key.sign(sign_content(label, content), ec.ECDSA(hashes.SHA256()))

    def proposal(self, group_id: bytes, epoch: int, proposal: bytes,
                 sender_index: int = 0) -> "ExternalProposal":
        """An external proposal as an ``MLSMessage(PublicMessage)``; ``proposal`` is a serialized
        ``Proposal`` (see :func:`add_proposal`, :func:`remove_proposal`)."""
        framed_content = (opaque(group_id) + struct.pack(">QBI", epoch, SENDER_EXTERNAL, sender_index)
                          + opaque(b"") + bytes((CONTENT_PROPOSAL,)) + proposal)
        # FramedContentTBS: version, wire format, content; no GroupContext for external senders.
        tbs = struct.pack(">HH", MLS10, WIRE_PUBLIC_MESSAGE) + framed_content
        auth = opaque(self.sign_with_label("FramedContentTBS", tbs))  # no confirmation tag: a proposal
        message = struct.pack(">HH", MLS10, WIRE_PUBLIC_MESSAGE) + framed_content + auth  # no membership tag
        authenticated_content = struct.pack(">H", WIRE_PUBLIC_MESSAGE) + framed_content + auth
        return ExternalProposal(message, ref_hash("MLS 1.0 Proposal Reference", authenticated_content))


@dataclass(frozen=True)
class ExternalProposal:
    message: bytes  # MLSMessage
    ref: bytes  # ProposalRef (32 bytes)


def add_proposal(key_package: bytes) -> bytes:
    return struct.pack(">H", PROPOSAL_ADD) + bytes(key_package)


def remove_proposal(leaf_index: int) -> bytes:
    return struct.pack(">HI", PROPOSAL_REMOVE, leaf_index)


def append_proposals_payload(messages: list[bytes]) -> bytes:
    """op 27 payload for ``operation_type`` 0: ``0x00 ‖ MLSMessage proposal_messages<V>``."""
    return b"\x00" + opaque(b"".join(messages))


def revoke_proposals_payload(refs: list[bytes]) -> bytes:
    """op 27 payload for ``operation_type`` 1: ``0x01 ‖ ProposalRef proposal_refs<V>``."""
    return b"\x01" + opaque(b"".join(opaque(r) for r in refs))


# -- parsing ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LeafNode:
    encryption_key: bytes
    signature_key: bytes
    credential_type: int
    identity: bytes
    source: int
    lifetime: tuple[int, int] | None


def _credential(r: Reader) -> tuple[int, bytes]:
    ctype = r.u16()
    if ctype == CREDENTIAL_BASIC:
        return ctype, r.opaque()
    if ctype == 2:  # x509: certificates<V> of opaque cert_data<V>
        return ctype, r.opaque()
    raise MlsDecodeError(f"unknown credential type {ctype}")


def _leaf_node(r: Reader) -> tuple[LeafNode, int, bytes]:
    """Parse a LeafNode; returns it, the offset where its signature starts, and the signature."""
    encryption_key = r.opaque()
    signature_key = r.opaque()
    ctype, identity = _credential(r)
    for _ in range(5):  # Capabilities: a struct of five vectors (versions, suites, extensions, ...)
        r.opaque()
    source = r.u8()
    lifetime = None
    if source == LEAF_SOURCE_KEY_PACKAGE:
        lifetime = (r.u64(), r.u64())
    elif source == LEAF_SOURCE_COMMIT:
        r.opaque()  # parent_hash
    elif source != LEAF_SOURCE_UPDATE:
        raise MlsDecodeError(f"unknown leaf node source {source}")
    _extensions(r)
    sig_at = r.pos
    signature = r.opaque()
    return LeafNode(encryption_key, signature_key, ctype, identity, source, lifetime), sig_at, signature


def _extensions(r: Reader) -> list[tuple[int, bytes]]:
    ext = r.vector()
    out = []
    while not ext.done:
        out.append((ext.u16(), ext.opaque()))
    return out


@dataclass(frozen=True)
class KeyPackage:
    raw: bytes
    version: int
    cipher_suite: int
    init_key: bytes
    leaf_node: LeafNode
    signature_ok: bool  # KeyPackageTBS and LeafNodeTBS signatures both verify

    @property
    def user_id(self) -> int | None:
        ident = self.leaf_node.identity
        return int.from_bytes(ident, "big") if self.leaf_node.credential_type == CREDENTIAL_BASIC \
            and len(ident) == 8 else None


def parse_key_package(data: bytes, r: Reader | None = None) -> KeyPackage:
    """Parse (and verify the signatures of) a bare KeyPackage, as op 26 carries it."""
    whole = r is None
    r = r if r is not None else Reader(data)
    start = r.pos
    version = r.u16()
    suite = r.u16()
    init_key = r.opaque()
    leaf_start = r.pos
    leaf, leaf_sig_at, leaf_sig = _leaf_node(r)
    _extensions(r)
    kp_sig_at = r.pos
    kp_sig = r.opaque()
    if whole:
        r.expect_done("KeyPackage")
    raw = r.data[start:r.pos]
    ok = (verify_with_label(leaf.signature_key, "LeafNodeTBS", r.data[leaf_start:leaf_sig_at], leaf_sig)
          and verify_with_label(leaf.signature_key, "KeyPackageTBS", r.data[start:kp_sig_at], kp_sig))
    return KeyPackage(raw, version, suite, init_key, leaf, ok)


def key_package_ref(key_package: bytes) -> bytes:
    return ref_hash("MLS 1.0 KeyPackage Reference", key_package)


@dataclass(frozen=True)
class Commit:
    raw: bytes  # the whole MLSMessage
    group_id: bytes
    epoch: int
    sender_type: int
    sender_index: int
    proposal_refs: tuple[bytes, ...]
    inline_proposals: tuple[int, ...]  # proposal types of inline proposals
    has_path: bool
    path_leaf: LeafNode | None


def _proposal(r: Reader) -> int:
    ptype = r.u16()
    if ptype == PROPOSAL_ADD:
        parse_key_package(b"", r)
    elif ptype == PROPOSAL_UPDATE:
        _leaf_node(r)
    elif ptype == PROPOSAL_REMOVE:
        r.u32()
    else:
        raise MlsDecodeError(f"proposal type {ptype} is not allowed in DAVE")
    return ptype


def parse_commit_message(data: bytes, r: Reader | None = None) -> Commit:
    """Walk an ``MLSMessage`` holding a PublicMessage commit; with ``r`` the reader stops after it
    (how op 28's ``commit ‖ welcome`` is split)."""
    whole = r is None
    r = r if r is not None else Reader(data)
    start = r.pos
    if r.u16() != MLS10:
        raise MlsDecodeError("not an MLS 1.0 message")
    wire = r.u16()
    if wire != WIRE_PUBLIC_MESSAGE:
        raise MlsDecodeError(f"commit must be a PublicMessage, wire format is {wire}")
    group_id = r.opaque()
    epoch = r.u64()
    sender_type = r.u8()
    sender_index = 0
    if sender_type in (SENDER_MEMBER, SENDER_EXTERNAL):
        sender_index = r.u32()
    elif sender_type not in (SENDER_NEW_MEMBER_PROPOSAL, SENDER_NEW_MEMBER_COMMIT):
        raise MlsDecodeError(f"unknown sender type {sender_type}")
    r.opaque()  # authenticated_data
    content_type = r.u8()
    if content_type != CONTENT_COMMIT:
        raise MlsDecodeError(f"content type {content_type}, expected a commit")
    proposals = r.vector()
    refs: list[bytes] = []
    inline: list[int] = []
    while not proposals.done:
        kind = proposals.u8()
        if kind == PROPOSAL_OR_REF_REFERENCE:
            refs.append(proposals.opaque())
        elif kind == PROPOSAL_OR_REF_PROPOSAL:
            inline.append(_proposal(proposals))
        else:
            raise MlsDecodeError(f"bad ProposalOrRef type {kind}")
    has_path = r.u8()
    path_leaf = None
    if has_path == 1:
        path_leaf, _, _ = _leaf_node(r)
        nodes = r.vector()
        while not nodes.done:
            nodes.opaque()  # encryption_key
            secrets = nodes.vector()
            while not secrets.done:
                secrets.opaque()  # kem_output
                secrets.opaque()  # ciphertext
    elif has_path != 0:
        raise MlsDecodeError("bad optional<UpdatePath> flag")
    r.opaque()  # signature
    r.opaque()  # confirmation_tag
    if sender_type == SENDER_MEMBER:
        r.opaque()  # membership_tag
    if whole:
        r.expect_done("the commit MLSMessage")
    return Commit(r.data[start:r.pos], group_id, epoch, sender_type, sender_index, tuple(refs),
                  tuple(inline), bool(has_path), path_leaf)


@dataclass(frozen=True)
class Welcome:
    raw: bytes
    cipher_suite: int
    new_member_refs: tuple[bytes, ...]  # KeyPackageRefs of the members it welcomes


def parse_welcome(data: bytes, r: Reader | None = None) -> Welcome:
    """A bare ``Welcome`` (not wrapped in MLSMessage), as op 28 appends and op 30 carries."""
    whole = r is None
    r = r if r is not None else Reader(data)
    start = r.pos
    suite = r.u16()
    secrets = r.vector()
    refs = []
    while not secrets.done:
        refs.append(secrets.opaque())  # new_member (KeyPackageRef)
        secrets.opaque()  # HPKECiphertext.kem_output
        secrets.opaque()  # HPKECiphertext.ciphertext
    r.opaque()  # encrypted_group_info
    if whole:
        r.expect_done("the Welcome")
    return Welcome(r.data[start:r.pos], suite, tuple(refs))


def split_commit_welcome(payload: bytes) -> tuple[Commit, Welcome | None]:
    """op 28 payload (after the opcode byte) → (commit, optional Welcome)."""
    r = Reader(payload)
    commit = parse_commit_message(payload, r)
    welcome = None
    if not r.done:
        welcome = parse_welcome(payload, r)
        r.expect_done("op 28")
    return commit, welcome


def parse_proposal_messages(vector_payload: bytes) -> list[tuple[bytes, int, int, bytes, bytes]]:
    """Read op 27 append data (after the operation byte) into one
    ``(group_id, epoch, proposal_type, FramedContentTBS, signature)`` per external proposal, so a
    test can verify the signature over the bytes it was made on (and compare with vectors)."""
    r = Reader(vector_payload)
    body = r.vector()
    r.expect_done("proposal_messages")
    out = []
    while not body.done:
        start = body.pos
        if body.u16() != MLS10 or body.u16() != WIRE_PUBLIC_MESSAGE:
            raise MlsDecodeError("not an MLS 1.0 PublicMessage")
        group_id = body.opaque()
        epoch = body.u64()
        if body.u8() != SENDER_EXTERNAL:
            raise MlsDecodeError("proposal not from an external sender")
        body.u32()
        body.opaque()
        if body.u8() != CONTENT_PROPOSAL:
            raise MlsDecodeError("not a proposal")
        ptype = _proposal(body)
        tbs = body.data[start:body.pos]
        signature = body.opaque()
        out.append((group_id, epoch, ptype, tbs, signature))
    return out
