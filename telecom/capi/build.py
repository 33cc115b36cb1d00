"""Build libtelecom.so (the C ABI) with CFFI's embedding mode: ``python -m telecom.capi.build --out DIR``.

What it owns: turning ``telecom.h`` into a CFFI embedding build — the declarations between the
``BEGIN/END TELECOM ABI`` markers become the exported ``extern "Python"`` functions, the thread-local
status/error functions are plain C compiled into the library — baking in where the interpreter and
telecom live, and writing ``libtelecom.so`` plus a copy of ``telecom.h`` to ``--out``.

Where things are found at run time (decided here, documented in telecom.h and docs/capi.md):

- libpython: the one this interpreter uses, linked with an rpath to its directory;
- telecom: the virtual environment this build runs in (``sys.prefix``), baked in; ``TELECOM_VENV``
  overrides it at run time.

What it must not do: write anything into the source tree (the build's scratch files go to a temporary
directory; the library is never committed).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEADER = HERE / "telecom.h"
MODULE_NAME = "_telecom_capi"

# Thread-local status and message: a C thread calling in has no lasting Python thread state (CFFI
# creates one per call), so threading.local would forget the error before the caller could read it.
C_SOURCE = r"""
#include <stdlib.h>
#include <string.h>
#include "telecom.h"

static __thread int telecom_status_tls = 0;
static __thread char telecom_error_tls[2048];

static void _telecom_set_error(int status, const char *message)
{
    telecom_status_tls = status;
    if (message == NULL) {
        telecom_error_tls[0] = '\0';
        return;
    }
    strncpy(telecom_error_tls, message, sizeof(telecom_error_tls) - 1);
    telecom_error_tls[sizeof(telecom_error_tls) - 1] = '\0';
}

/* Process exit. The host never finalises the embedded interpreter, so without this its threads (decode,
 * io, media) would keep running while exit() unloads libraries under them — a decode thread still in
 * dlopen() when a library's destructor runs corrupts the heap — and Python's own exit functions (which
 * finalise recordings) would never run. The hook stops telecom's threads and runs them; then the GIL is
 * taken for good, so no Python thread runs while the process unloads. */
static void _telecom_exit_hook(void);

static void _telecom_at_exit(void)
{
    _telecom_exit_hook();
    (void)PyGILState_Ensure();
}

static int _telecom_register_exit(void) { return atexit(_telecom_at_exit); }

int telecom_last_status(void) { return telecom_status_tls; }
const char *telecom_last_error(void) { return telecom_error_tls; }

const char *telecom_status_name(int status)
{
    switch (status) {
    case TELECOM_OK: return "TELECOM_OK";
    case TELECOM_E_INVALID: return "TELECOM_E_INVALID";
    case TELECOM_E_TIMEOUT: return "TELECOM_E_TIMEOUT";
    case TELECOM_E_FULL: return "TELECOM_E_FULL";
    case TELECOM_E_CLOSED: return "TELECOM_E_CLOSED";
    case TELECOM_E_UNSUPPORTED: return "TELECOM_E_UNSUPPORTED";
    case TELECOM_E_CONNECTION: return "TELECOM_E_CONNECTION";
    case TELECOM_E_INIT: return "TELECOM_E_INIT";
    case TELECOM_E_IO: return "TELECOM_E_IO";
    case TELECOM_E_EMPTY: return "TELECOM_E_EMPTY";
    case TELECOM_E_INTERNAL: return "TELECOM_E_INTERNAL";
    default: return "TELECOM_E_UNKNOWN";
    }
}
"""

# Declarations Python calls or implements, not exported: the error setter, the exit hook (see C_SOURCE).
PRIVATE_CDEF = """
static void _telecom_set_error(int status, const char *message);
static int _telecom_register_exit(void);
extern "Python" static void _telecom_exit_hook(void);
"""


def abi_declarations() -> str:
    """The exported declarations of telecom.h (the marked region), for ``embedding_api``."""
    text = HEADER.read_text()
    match = re.search(r"/\* BEGIN TELECOM ABI.*?\*/(.*)/\* END TELECOM ABI \*/", text, re.S)
    if match is None:
        raise RuntimeError(f"{HEADER}: the BEGIN/END TELECOM ABI markers are missing")
    return match.group(1)


def exported_functions(declarations: str) -> list[str]:
    body = re.sub(r"/\*.*?\*/", "", declarations, flags=re.S)
    body = re.sub(r"typedef[^;]*\{[^}]*\}[^;]*;", "", body, flags=re.S)
    body = re.sub(r"typedef[^;]*;", "", body)
    return re.findall(r"\b([a-z_][a-z0-9_]*)\s*\(", body)


def init_code(venv: str, exports: list[str]) -> str:
    source = (HERE / "_embed.py").read_text()
    return (f"{source}\n\nfrom {MODULE_NAME} import ffi as _ffi, lib as _lib\n"
            f"boot(_ffi, _lib, {venv!r}, {exports!r})\n")


def build(out: str | os.PathLike, *, venv: str | None = None, verbose: bool = False) -> Path:
    """Compile ``libtelecom.so`` into ``out`` (created if needed) and copy ``telecom.h`` next to it."""
    import cffi

    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    venv = os.path.abspath(venv or sys.prefix)
    declarations = abi_declarations()
    exports = exported_functions(declarations)

    ffibuilder = cffi.FFI()
    ffibuilder.embedding_api(declarations)
    ffibuilder.cdef(PRIVATE_CDEF)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ffibuilder.set_source(
        MODULE_NAME, C_SOURCE, include_dirs=[str(HERE)],
        extra_link_args=[f"-Wl,-rpath,{libdir}", "-Wl,-soname,libtelecom.so"] if libdir else [],
    )
    ffibuilder.embedding_init_code(init_code(venv, exports))
    with tempfile.TemporaryDirectory(prefix="telecom-capi-build-") as tmp:
        built = ffibuilder.compile(tmpdir=tmp, target="libtelecom.*", verbose=verbose)
        target = out_dir / "libtelecom.so"
        tmp_target = out_dir / f".libtelecom.so.{os.getpid()}"
        shutil.copyfile(built, tmp_target)
        os.chmod(tmp_target, 0o755)
        os.replace(tmp_target, target)  # atomic: a running program keeps its mapped copy
    shutil.copyfile(HEADER, out_dir / "telecom.h")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m telecom.capi.build",
                                     description="Build libtelecom.so (telecom's C ABI) and copy telecom.h.")
    parser.add_argument("--out", default="build/capi", help="output directory (default build/capi)")
    parser.add_argument("--venv", help="environment with telecom installed, baked in as the default "
                                       "(default: this interpreter's, %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    try:
        target = build(args.out, venv=args.venv, verbose=args.verbose)
    except ImportError as exc:
        print(f"building the C ABI needs cffi: pip install 'telecom[capi]' ({exc})", file=sys.stderr)
        return 2
    print(target)
    print(target.parent / "telecom.h")
    return 0


if __name__ == "__main__":
    sys.exit(main())
