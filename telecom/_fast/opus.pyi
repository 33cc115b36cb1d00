"""Type stubs for telecom._fast.opus (the Python-visible contract)."""

from typing import Literal

from typing_extensions import Buffer

SAMPLE_RATE: int
CHANNELS: int
FRAME_SAMPLES: int
FRAME_BYTES: int
SILENCE_FRAME: bytes
MAX_PACKET_BYTES: int
DEFAULT_FEC_LOSS: int
LIBOPUS_VERSION: str

class Encoder:
    channels: int
    sample_rate: int
    frame_samples: int
    frame_bytes: int
    lookahead: int
    def __init__(
        self,
        *,
        bitrate: int = 64000,
        complexity: int = 10,
        fec: bool = False,
        expected_loss: int = 0,
        application: Literal["audio", "voip", "lowdelay"] = "audio",
        channels: int = 2,
        sample_rate: int = 48000,
    ) -> None: ...
    def encode(self, pcm: Buffer) -> bytes: ...
    def reset(self) -> None: ...
    @property
    def application(self) -> str: ...
    @property
    def bitrate(self) -> int: ...
    @bitrate.setter
    def bitrate(self, value: int) -> None: ...
    @property
    def complexity(self) -> int: ...
    @complexity.setter
    def complexity(self, value: int) -> None: ...
    @property
    def fec(self) -> bool: ...
    @fec.setter
    def fec(self, value: bool) -> None: ...
    @property
    def expected_loss(self) -> int: ...
    @expected_loss.setter
    def expected_loss(self, value: int) -> None: ...

class Decoder:
    channels: int
    sample_rate: int
    frame_samples: int
    def __init__(self, *, channels: int = 2, sample_rate: int = 48000) -> None: ...
    def decode(self, packet: Buffer | None, *, fec: bool = False, frame_samples: int | None = None) -> bytes: ...
    def reset(self) -> None: ...

def packet_samples(packet: Buffer) -> int: ...
