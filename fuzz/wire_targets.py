"""Fuzz targets for the wire parsers: RTP/RTCP classification, header parse, extension elements,
padding, and rtpsize AEAD open in both modes.

Each target runs the compiled module (:mod:`telecom._fast`) and its pure-Python twin
(:mod:`telecom._twin`) on the same bytes and fails if they disagree, or if anything other than the
documented :class:`~telecom.errors.PacketError` family comes out. The twin is the readable reference,
so a disagreement is a bug in one of them. The same function serves atheris (``fuzz/run.py``), the
corpus replay in the test suite, and hypothesis.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

from telecom._fast import load
from telecom._twin import aead as twin_aead
from telecom._twin import rtp as twin_rtp
from telecom.errors import PacketError


def _load_fast(name: str):
    """The compiled module; from ``$TELECOM_FUZZ_LIB`` (an instrumented build) when that is set."""
    lib = os.environ.get("TELECOM_FUZZ_LIB")
    if not lib:
        return load(name)
    path = next(pathlib.Path(lib).glob(f"{name}.cpython-*.so"))
    spec = importlib.util.spec_from_file_location(f"telecom._fast.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # aead cimports rtp: it must find this instrumented one
    spec.loader.exec_module(module)
    return module


fast_rtp = _load_fast("rtp")
fast_aead = _load_fast("aead")

KEY = bytes(range(32))
MODES = (fast_aead.AES256_GCM_RTPSIZE, fast_aead.XCHACHA20_POLY1305_RTPSIZE)
_CIPHERS = {m: (fast_aead.TransportCipher(m, KEY), twin_aead.TransportCipher(m, KEY)) for m in MODES}


class Disagreement(AssertionError):
    """The compiled module and the twin answered differently for the same input."""


def _outcome(fn, data: bytes):
    try:
        return "ok", fn(data)
    except PacketError as exc:
        return "error", type(exc).__name__
    # anything else propagates: an unexpected exception type is itself a finding


def _header_tuple(h) -> tuple:
    return (h.version, h.padding, h.extension, h.marker, h.payload_type, h.sequence, h.timestamp, h.ssrc,
            tuple(h.csrcs), h.extension_profile, h.extension_length, h.header_length, h.aad_length)


def check_rtp(data: bytes) -> None:
    """classify / parse_header / parse_extension_elements / strip_padding agree between fast and twin."""
    if int(fast_rtp.classify(data)) != int(twin_rtp.classify(data)):
        raise Disagreement(f"classify differs for {data.hex()}")
    a = _outcome(fast_rtp.parse_header, data)
    b = _outcome(twin_rtp.parse_header, data)
    if a[0] != b[0] or (a[0] == "ok" and _header_tuple(a[1]) != _header_tuple(b[1])) or \
            (a[0] == "error" and a[1] != b[1]):
        raise Disagreement(f"parse_header differs for {data.hex()}: {a} vs {b}")
    if a[0] == "ok":  # a header that parses packs back to the bytes it came from
        h = a[1]
        packed = h.pack()
        if packed != bytes(data[:len(packed)]):
            raise Disagreement(f"parse/pack round trip changed {data[:len(packed)].hex()} -> {packed.hex()}")
    for name in ("parse_extension_elements", "strip_padding"):
        x = _outcome(getattr(fast_rtp, name), data)
        y = _outcome(getattr(twin_rtp, name), data)
        if x != y:
            raise Disagreement(f"{name} differs for {data.hex()}: {x} vs {y}")


def check_open(data: bytes) -> None:
    """Opening arbitrary bytes fails cleanly (DecryptError/PacketError) the same way in both."""
    for mode, (fast, twin) in _CIPHERS.items():
        a = _outcome(fast.open, data)
        b = _outcome(twin.open, data)
        if a[0] != b[0]:
            raise Disagreement(f"{mode} open differs for {data.hex()}: {a} vs {b}")


def check_sealed(data: bytes) -> None:
    """Bytes used as a payload survive seal (fast) → open (twin) and the reverse, in both modes."""
    if len(data) < 3:
        return
    seq = data[0] | data[1] << 8
    header = twin_rtp.pack_header(seq, seq * 960, 0x1234)
    payload = bytes(data[2:])
    for mode, (fast, twin) in _CIPHERS.items():
        for sealer, opener in ((fast, twin), (twin, fast)):
            packet = sealer.seal(header, payload, seq)
            opened = opener.open(packet)
            if opened.payload != payload or opened.counter != seq:
                raise Disagreement(f"{mode} seal/open lost the payload {payload.hex()}")


def one_input(data: bytes) -> None:
    """The atheris entry point: every wire target on one input."""
    check_rtp(data)
    check_open(data)
    check_sealed(data)
