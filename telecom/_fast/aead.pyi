"""Type stubs for telecom._fast.aead (same API as telecom._twin.aead)."""

from typing import Iterable, NamedTuple, Sequence

from _typeshed import ReadableBuffer

from telecom._fast.rtp import RtpHeader

AES256_GCM_RTPSIZE: str
XCHACHA20_POLY1305_RTPSIZE: str
SUPPORTED_MODES: tuple[str, ...]

class OpenedPacket(NamedTuple):
    header: RtpHeader
    payload: bytes
    extension_body: bytes
    counter: int

def choose_mode(offered: Iterable[str]) -> str: ...

class TransportCipher:
    @property
    def mode(self) -> str: ...
    def __init__(self, mode: str, key: ReadableBuffer | Sequence[int]) -> None: ...
    def seal(self, header: ReadableBuffer, payload: ReadableBuffer, counter: int) -> bytes: ...
    def open(self, packet: ReadableBuffer) -> OpenedPacket: ...
    def open_rtcp(self, packet: ReadableBuffer) -> bytes: ...

def _aead_primitive_encrypt(
    mode: str, key: ReadableBuffer, nonce: ReadableBuffer, aad: ReadableBuffer, plaintext: ReadableBuffer
) -> bytes: ...
def _aead_primitive_decrypt(
    mode: str, key: ReadableBuffer, nonce: ReadableBuffer, aad: ReadableBuffer,
    ciphertext_and_tag: ReadableBuffer,
) -> bytes: ...
def _bench_c_seal(mode: str, iterations: int, payload_len: int = 160, rekey: bool = False) -> int: ...
