"""RTP headers, demultiplexing and wrap-around arithmetic (spec §2.3, §2.4, §2.7).

Every test runs against the compiled module and the pure-Python twin (the ``rtp`` fixture), so the
two are held to the same bytes and the same error messages.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telecom._fast import load
from telecom._twin import rtp as twin_rtp
from telecom.errors import ConfigurationError, PacketError

IMPLEMENTATIONS = {"fast": lambda: load("rtp"), "twin": lambda: twin_rtp}


@pytest.fixture(params=sorted(IMPLEMENTATIONS), scope="module")
def rtp(request):
    return IMPLEMENTATIONS[request.param]()


u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)


# --- the send header (spec §2.3) ------------------------------------------------------------------

def test_pack_header_matches_the_spec_layout(rtp):
    # 0x80 (V=2), 0x78 (PT 120 = Opus), sequence BE16, timestamp BE32, SSRC BE32
    assert rtp.pack_header(1, 960, 42) == bytes.fromhex("80 78 0001 000003c0 0000002a")
    assert rtp.pack_header(0xFFFF, 0xFFFFFFFF, 0xDEADBEEF) == bytes.fromhex("8078ffffffffffffdeadbeef")
    assert rtp.pack_header(7, 8, 9, payload_type=0x6F, marker=True) == bytes.fromhex(
        "80ef0007000000080000 0009".replace(" ", ""))


@pytest.mark.parametrize("kwargs", [
    {"sequence": 0x10000}, {"sequence": -1}, {"timestamp": 1 << 32}, {"ssrc": -5},
    {"payload_type": 128},
])
def test_pack_header_rejects_out_of_range_fields(rtp, kwargs):
    args = {"sequence": 1, "timestamp": 2, "ssrc": 3, **kwargs}
    with pytest.raises(ConfigurationError, match=f"{next(iter(kwargs))} must be in"):
        rtp.pack_header(**args)


def test_header_object_packs_csrcs_and_extension_preamble(rtp):
    h = rtp.RtpHeader(sequence=5, timestamp=6, ssrc=7, csrcs=[0x11111111, 0x22222222],
                      extension_profile=0xBEDE, extension_length=3, marker=True, padding=True)
    assert h.extension is True
    # V=2 P=1 X=1 CC=2 -> 0b10_1_1_0010 = 0xb2; M=1 PT=120 -> 0xf8
    assert h.pack() == bytes.fromhex("b2f8 0005 00000006 00000007 11111111 22222222 bede 0003"
                                     .replace(" ", ""))
    assert h.aad_length == 12 + 8 + 4
    assert h.header_length == 12 + 8 + 4 + 12
    plain = rtp.RtpHeader(1, 2, 3)
    assert (plain.aad_length, plain.header_length) == (12, 12)
    assert plain.pack() == rtp.pack_header(1, 2, 3)


def test_header_equality_hash_repr_and_immutability(rtp):
    a = rtp.RtpHeader(1, 2, 3, csrcs=(9,))
    b = rtp.RtpHeader(sequence=1, timestamp=2, ssrc=3, csrcs=[9])
    c = rtp.RtpHeader(1, 2, 4, csrcs=(9,))
    assert a == b and hash(a) == hash(b)
    assert a != c
    assert a != (1, 2, 3)
    assert repr(a) == ("RtpHeader(version=2, padding=False, extension=False, marker=False, "
                       "payload_type=120, sequence=1, timestamp=2, ssrc=3, csrcs=(9,), "
                       "extension_profile=None, extension_length=0)")
    assert "extension_profile=0xbede" in repr(rtp.RtpHeader(1, 2, 3, extension_profile=0xBEDE))
    with pytest.raises(AttributeError):
        a.sequence = 5


@pytest.mark.parametrize("kwargs, message", [
    ({"csrcs": range(16)}, "at most 15 CSRCs"),
    ({"extension": True}, "needs an extension_profile"),
    ({"extension": False, "extension_profile": 0xBEDE}, "given but extension=False"),
    ({"extension_length": 2}, "given but extension=False"),
    ({"extension_profile": 0x10000}, "extension_profile must be in"),
    ({"csrcs": [1 << 32]}, "csrc must be in"),
    ({"version": 4}, "version must be in"),
])
def test_header_object_validates_fields(rtp, kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        rtp.RtpHeader(1, 2, 3, **kwargs)


# --- parsing ----------------------------------------------------------------------------------------

def test_parse_header_reads_every_field(rtp):
    packet = bytes.fromhex("b1 e4 1234 89abcdef 01020304 cafebabe bede 0002".replace(" ", "")) + b"rest"
    h = rtp.parse_header(packet)
    assert (h.version, h.padding, h.extension, h.marker, h.payload_type) == (2, True, True, True, 100)
    assert (h.sequence, h.timestamp, h.ssrc) == (0x1234, 0x89ABCDEF, 0x01020304)
    assert h.csrcs == (0xCAFEBABE,)
    assert (h.extension_profile, h.extension_length) == (0xBEDE, 2)
    assert h.aad_length == 20
    # any bytes-like works
    assert rtp.parse_header(bytearray(packet)) == h == rtp.parse_header(memoryview(packet))


@pytest.mark.parametrize("packet, message", [
    (b"", "RTP packet too short: 0 bytes, the fixed header is 12"),
    (bytes.fromhex("8078000100000002000000"), "RTP packet too short: 11 bytes, the fixed header is 12"),
    (bytes.fromhex("407800010000000200000003"), "not an RTP packet: version 1, expected 2"),
    (bytes.fromhex("0002004600000001") + bytes(66), "not an RTP packet: version 0, expected 2"),
    (bytes.fromhex("83780001000000020000000300000001"),
     "RTP header with 3 CSRCs needs 24 bytes, packet has 16"),
    (bytes.fromhex("9078000100000002000000030000"),
     "RTP header extension preamble truncated: needs 16 bytes, packet has 14"),
    (bytes.fromhex("917800010000000200000003aaaaaaaabede"),
     "RTP header extension preamble truncated: needs 20 bytes, packet has 18"),
])
def test_parse_header_errors_are_precise(rtp, packet, message):
    with pytest.raises(PacketError) as info:
        rtp.parse_header(packet)
    assert str(info.value) == message


header_strategy = st.builds(
    lambda seq, ts, ssrc, pt, marker, padding, csrcs, ext: dict(
        sequence=seq, timestamp=ts, ssrc=ssrc, payload_type=pt, marker=marker, padding=padding,
        csrcs=csrcs, extension_profile=None if ext is None else ext[0],
        extension_length=0 if ext is None else ext[1]),
    u16, u32, u32, st.integers(0, 127), st.booleans(), st.booleans(),
    st.lists(u32, max_size=15), st.none() | st.tuples(u16, u16),
)


@given(fields=header_strategy, tail=st.binary(max_size=40))
def test_pack_parse_round_trip(rtp, fields, tail):
    h = rtp.RtpHeader(**fields)
    packed = h.pack()
    assert len(packed) == h.aad_length
    assert rtp.parse_header(packed + tail) == h
    # the first 12 bytes agree with an independent struct encoding of RFC 3550 §5.1
    b0 = 0x80 | (0x20 if fields["padding"] else 0) | (0x10 if fields["extension_profile"] is not None
                                                        else 0) | len(fields["csrcs"])
    b1 = (0x80 if fields["marker"] else 0) | fields["payload_type"]
    assert packed[:12] == struct.pack(">BBHII", b0, b1, fields["sequence"], fields["timestamp"],
                                      fields["ssrc"])


@settings(max_examples=300)
@given(data=st.binary(max_size=80))
def test_parse_header_never_crashes(rtp, data):
    try:
        h = rtp.parse_header(data)
    except PacketError:
        return
    assert h.pack() == data[:h.aad_length]


@given(data=st.binary(max_size=80))
def test_fast_and_twin_parse_identically(data):
    fast = load("rtp")

    def outcome(mod):
        try:
            return repr(mod.parse_header(data))
        except PacketError as exc:
            return f"error: {exc}"

    assert outcome(fast) == outcome(twin_rtp)


# --- demultiplexing (spec §2.7) --------------------------------------------------------------------

@pytest.mark.parametrize("second_byte, kind", [
    (0x78, "RTP"), (0xF8, "RTP"), (191, "RTP"), (224, "RTP"),
    (192, "RTCP"), (200, "RTCP"), (201, "RTCP"), (206, "RTCP"), (223, "RTCP"),
])
def test_classify_by_second_byte(rtp, second_byte, kind):
    packet = bytes([0x80, second_byte]) + bytes(30)
    assert rtp.classify(packet) is rtp.PacketKind[kind]
    assert rtp.classify(bytearray(packet)) == rtp.PacketKind[kind]


def test_classify_other_traffic(rtp):
    discovery_reply = struct.pack(">HHI", 2, 70, 1234) + b"203.0.113.5".ljust(64, b"\0") + b"\x1f\x90"
    assert rtp.classify(discovery_reply) is rtp.PacketKind.OTHER
    # an 8-byte keepalive echo (LE counter) whose first two bytes look like V=2 + RTCP type 200
    keepalive = struct.pack("<I", 0xC880) + bytes(4)
    assert (keepalive[0] >> 6, keepalive[1]) == (2, 200)
    assert rtp.classify(keepalive) is rtp.PacketKind.OTHER
    assert rtp.classify(b"") is rtp.PacketKind.OTHER
    assert rtp.classify(bytes([0x80, 0x78]) + bytes(9)) is rtp.PacketKind.OTHER   # 11 bytes
    assert rtp.classify(bytes([0x40, 0x78]) + bytes(30)) is rtp.PacketKind.OTHER  # version 1
    assert rtp.classify(bytes([0xC0, 0xC8]) + bytes(30)) is rtp.PacketKind.OTHER  # version 3
    assert [k.value for k in rtp.PacketKind] == [0, 1, 2]


# --- wrap-around arithmetic -------------------------------------------------------------------------

def test_wrap_helpers_at_the_edges(rtp):
    assert rtp.seq_add(65535, 1) == 0
    assert rtp.seq_add(0, -1) == 65535
    assert rtp.seq_diff(0, 65535) == 1
    assert rtp.seq_diff(65535, 0) == -1
    assert rtp.seq_diff(0x8000, 0) == 0x8000          # the half-way point counts as ahead
    assert rtp.seq_diff(0x8001, 0) == -0x7FFF
    assert rtp.ts_add(0xFFFFFC40, 960) == 0           # true modular, not discord.py's reset-to-0
    assert rtp.ts_add(0xFFFFFFFF, 960) == 959
    assert rtp.ts_diff(959, 0xFFFFFFFF) == 960
    assert rtp.ts_diff(0x80000000, 0) == 0x80000000
    assert rtp.ts_diff(0x80000001, 0) == -0x7FFFFFFF
    assert rtp.counter_next(0xFFFFFFFF) == 0
    assert rtp.counter_next(41) == 42


@given(a=u16, n=st.integers(-(2**15) + 1, 2**15))
def test_seq_diff_inverts_seq_add(rtp, a, n):
    b = rtp.seq_add(a, n)
    assert 0 <= b <= 0xFFFF
    assert rtp.seq_diff(b, a) == n


@given(a=u32, n=st.integers(-(2**31) + 1, 2**31))
def test_ts_diff_inverts_ts_add(rtp, a, n):
    b = rtp.ts_add(a, n)
    assert 0 <= b <= 0xFFFFFFFF
    assert rtp.ts_diff(b, a) == n


@given(c=u32, steps=st.integers(0, 5))
def test_counter_next_is_plus_one_mod_2_32(rtp, c, steps):
    x = c
    for _ in range(steps):
        x = rtp.counter_next(x)
    assert x == (c + steps) % 2**32


# --- RFC 8285 one-byte extension elements and RTP padding -----------------------------------------

def test_extension_elements(rtp):
    # id 1 len 1, two padding bytes, id 3 len 3, then padding to a 32-bit boundary
    body = bytes([0x10, 0xAA, 0x00, 0x00, 0x32, 1, 2, 3, 0x00, 0x00, 0x00, 0x00])
    assert rtp.parse_extension_elements(body) == [(1, b"\xaa"), (3, b"\x01\x02\x03")]
    # id 15 ends parsing: what follows is ignored even if it would overrun
    assert rtp.parse_extension_elements(bytes([0x10, 0x7F, 0xF5, 0x20])) == [(1, b"\x7f")]
    assert rtp.parse_extension_elements(b"") == []
    assert rtp.parse_extension_elements(bytearray([0x1F]) + bytes(range(16))) == [(1, bytes(range(16)))]


def test_extension_element_overrun(rtp):
    with pytest.raises(PacketError) as info:
        rtp.parse_extension_elements(bytes([0x10, 0xAA, 0x23, 0x01]))
    assert str(info.value) == ("RTP header extension element (id 2) needs 4 bytes at offset 3, "
                               "only 1 left")


def test_strip_padding(rtp):
    assert rtp.strip_padding(b"opus\x00\x00\x03") == b"opus"
    assert rtp.strip_padding(b"opus\x01") == b"opus"
    assert rtp.strip_padding(b"\x04\x04\x04\x04") == b""
    for bad, message in [(b"", "RTP padding bit set but the payload is empty"),
                         (b"opus\x00", "RTP padding count is 0 (must be at least 1)"),
                         (b"ab\x05", "RTP padding count 5 exceeds the 3-byte payload")]:
        with pytest.raises(PacketError) as info:
            rtp.strip_padding(bad)
        assert str(info.value) == message


# --- the selector ------------------------------------------------------------------------------------

@pytest.mark.parametrize("env, expected", [("0", "fast"), ("1", "twin")])
def test_selector_picks_the_implementation(env, expected):
    code = ("import telecom.rtp as r, telecom.aead as a; "
            "print(r.IMPLEMENTATION, a.IMPLEMENTATION, r.RtpHeader.__module__, a.TransportCipher.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TELECOM_NO_EXTENSIONS": env}).stdout.split()
    assert out[:2] == [expected, expected]
    prefix = "telecom._fast" if expected == "fast" else "telecom._twin"
    assert out[2].startswith(prefix) and out[3].startswith(prefix)
