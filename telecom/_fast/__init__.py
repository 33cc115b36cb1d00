"""Compiled core: Cython modules for every per-packet and per-frame job.

Import the compiled modules through :func:`load`, which turns a missing system library into an
``ImportError`` that names the Debian package to install. ``TELECOM_NO_EXTENSIONS=1`` makes the
selecting modules (``telecom.rtp``, ``telecom.aead``, ``telecom.mixer``) use the pure-Python twins in
``telecom._twin`` instead.
"""

from __future__ import annotations

import importlib
import os

NO_EXTENSIONS = os.environ.get("TELECOM_NO_EXTENSIONS", "") not in ("", "0")

# shared object name fragment -> Debian package that provides it
_SYSTEM_LIBS = {
    "libopus": "libopus0 (build: libopus-dev)",
    "libsodium": "libsodium23 (build: libsodium-dev)",
    "libcrypto": "libssl3 (build: libssl-dev)",
}


def load(name: str):
    """Import ``telecom._fast.<name>`` with a helpful error when it cannot load."""
    try:
        return importlib.import_module(f"telecom._fast.{name}")
    except ImportError as exc:
        text = str(exc)
        for frag, pkg in _SYSTEM_LIBS.items():
            if frag in text:
                raise ImportError(
                    f"telecom's compiled module {name!r} needs the system library {frag}: "
                    f"install the Debian package {pkg} (apt-get install {pkg.split()[0]})"
                ) from exc
        raise ImportError(
            f"telecom's compiled module {name!r} is not built ({text}); reinstall telecom with "
            f"'pip install .' (needs Cython, gcc, libopus-dev, libsodium-dev, libssl-dev), or set "
            f"TELECOM_NO_EXTENSIONS=1 to use the pure-Python twins where they exist"
        ) from exc
