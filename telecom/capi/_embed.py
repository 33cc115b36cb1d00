"""The start-up code of libtelecom.so: runs once, inside the embedded interpreter, on the first C call.

What it owns: finding the environment that has telecom installed (``TELECOM_VENV`` if set, else the
virtual environment baked in at build time), importing :mod:`telecom.capi._impl` and attaching the C
functions to it. If any of that fails, every C function is still attached — to a stand-in that returns
``TELECOM_E_INIT`` (or NULL) and puts the reason in ``telecom_last_error()`` — because an unattached
CFFI function would print a warning and return 0, which C would read as ``TELECOM_OK``.

What it must not do: import telecom before the path is set up, or anything else at module level (the
build reads this file's source and appends one ``boot(...)`` call to it).
"""

from __future__ import annotations

TELECOM_E_INIT = -7


def _site_dirs(venv: str) -> list[str]:
    import glob
    import os
    import sys

    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [os.path.join(venv, "lib", version, "site-packages")]
    candidates += glob.glob(os.path.join(venv, "lib", "python3*", "site-packages"))
    return [d for d in dict.fromkeys(candidates) if os.path.isdir(d)]


def _ignore_sigpipe() -> None:
    """A write to a socket the peer closed raises SIGPIPE, whose default action kills the process.
    The python executable ignores it at start-up (writes fail with EPIPE instead); an embedded
    interpreter does not, so a voice server closing the websocket (e.g. 4004) could kill the C host.
    Ignore it when it is at its default, and keep a handler the host installed. Through libc, not
    :mod:`signal`: Python does not know the host's handlers and may not be on its main thread here."""
    import ctypes
    import signal

    if not hasattr(signal, "SIGPIPE"):
        return
    libc = ctypes.CDLL(None)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
    old = libc.signal(signal.SIGPIPE, 1)  # SIG_IGN; the disposition is process-wide
    if old not in (None, 0):              # not SIG_DFL: the host's own choice, put it back
        libc.signal(signal.SIGPIPE, old)


def boot(ffi, lib, baked_venv: str, exports: list[str]) -> None:  # noqa: ANN001 - CFFI objects
    import os
    import site
    import sys

    _ignore_sigpipe()
    problem = None
    venv = os.environ.get("TELECOM_VENV") or baked_venv
    source = "TELECOM_VENV" if os.environ.get("TELECOM_VENV") else "the build-time venv"
    dirs = _site_dirs(venv)
    if not dirs:
        problem = (f"telecom: no site-packages for Python {sys.version_info.major}.{sys.version_info.minor} "
                   f"under {venv!r} ({source}); set TELECOM_VENV to a virtual environment with telecom "
                   "installed")
    else:
        for d in dirs:
            site.addsitedir(d)
        try:
            from telecom.capi import _impl

            _impl.install(ffi, lib, exports)
            return
        except BaseException as exc:  # noqa: BLE001 - reported through every C call instead
            problem = (f"telecom could not be loaded from {venv!r} ({source}): "
                       f"{type(exc).__name__}: {exc}")
    _install_failures(ffi, lib, exports, problem)


def _install_failures(ffi, lib, exports: list[str], problem: str) -> None:  # noqa: ANN001
    import sys

    print(problem, file=sys.stderr)
    message = problem.encode("utf-8", "replace")

    for name in exports:
        kind = ffi.typeof(getattr(lib, name)).result

        def failed(*args, _kind=kind):  # noqa: ANN002, ANN202
            lib._telecom_set_error(TELECOM_E_INIT, message)
            if _kind.kind == "pointer":
                return ffi.NULL
            if _kind.kind == "void":
                return None
            return TELECOM_E_INIT

        ffi.def_extern(name=name)(failed)
