"""Build switches and the list of Cython extensions; all metadata lives in pyproject.toml.

Every ``telecom/_fast/*.pyx`` is one extension. ``TELECOM_DEBUG=1`` compiles invariant checks in;
``TELECOM_ONLY=rtp,aead`` limits a developer build to some modules. ``TELECOM_LIBOPUS=PREFIX`` links
``PREFIX/lib/libopus.a`` (from ``scripts/build-libopus``, which scripts/bootstrap runs) statically
instead of the system's ``libopus.so``.
"""
import os
import pathlib

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError as exc:  # pragma: no cover
    raise SystemExit("building telecom needs Cython>=3.0 (pip install Cython)") from exc

HERE = pathlib.Path(__file__).parent
FAST = HERE / "telecom" / "_fast"
DEBUG = os.environ.get("TELECOM_DEBUG") == "1"
ONLY = {m for m in os.environ.get("TELECOM_ONLY", "").split(",") if m}

# -O2, not -O3: measured 1.6-3.3x faster for the int16 mixing loop with gcc 12 (PERFORMANCE.md).
CFLAGS = ["-O0", "-g"] if DEBUG else ["-O2"]
MACROS = [("TELECOM_DEBUG", "1")] if DEBUG else []
# libopus (Opus), libsodium (XChaCha20-Poly1305), OpenSSL libcrypto (AES-256-GCM).
LIBS = ["opus", "sodium", "crypto"]
OPUS_INCLUDE = "/usr/include/opus"
EXTRA_OBJECTS = []
LINK_ARGS = []
LIBOPUS = os.environ.get("TELECOM_LIBOPUS", "")
if LIBOPUS and LIBOPUS != "system":
    prefix = pathlib.Path(LIBOPUS)
    archive = prefix / "lib" / "libopus.a"
    if not archive.is_file() or not (prefix / "include" / "opus" / "opus.h").is_file():
        raise SystemExit(f"TELECOM_LIBOPUS={LIBOPUS}: no lib/libopus.a and include/opus/opus.h there")
    OPUS_INCLUDE = str(prefix / "include" / "opus")
    # The archive goes last on the link line; the linker takes only the members an extension uses.
    EXTRA_OBJECTS = [str(archive)]
    # Keep libopus's symbols private to each extension, so they never interpose on another copy
    # loaded in the same process (PyAV's bundled libopus, the system's through ctypes).
    LINK_ARGS = ["-Wl,--exclude-libs,libopus.a"]
    LIBS = ["sodium", "crypto", "m"]

extensions = []
for pyx in sorted(FAST.glob("*.pyx")):
    if ONLY and pyx.stem not in ONLY:
        continue
    extensions.append(
        Extension(
            f"telecom._fast.{pyx.stem}",
            [str(pyx.relative_to(HERE))],
            include_dirs=[str(FAST / "csrc"), OPUS_INCLUDE],
            libraries=LIBS,
            extra_objects=EXTRA_OBJECTS,
            extra_link_args=LINK_ARGS,
            extra_compile_args=CFLAGS,
            define_macros=MACROS,
        )
    )

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"embedsignature": True},
        include_path=[str(FAST), str(FAST / "includes")],
        annotate=False,
    ),
)
