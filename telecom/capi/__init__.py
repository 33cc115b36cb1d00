"""telecom.capi: the C ABI — ``telecom.h`` and ``libtelecom.so`` (CFFI embedding mode).

What it owns: the header (``telecom.h``, the contract C callers see), the build
(``python -m telecom.capi.build --out DIR``), the embedded start-up code (``_embed.py``) and the
implementation of every C function over the Python API (``_impl.py``). See ``docs/capi.md``.

What it must not do: keep state or behaviour of its own beyond handles and event queues — a C caller
gets exactly what :class:`telecom.Client` and :class:`telecom.Playable` do.
"""

from pathlib import Path

HEADER_PATH = Path(__file__).resolve().parent / "telecom.h"

__all__ = ["HEADER_PATH"]
