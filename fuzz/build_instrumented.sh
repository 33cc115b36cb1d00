#!/usr/bin/env bash
# Build telecom's wire parsers and jitter buffer (rtp, aead, jitter) with clang's libFuzzer coverage and AddressSanitizer into
# build/fuzz/ (fuzz/wire_targets.py loads them when TELECOM_FUZZ_LIB points there), then print how to
# run the fuzzer against them. Needs clang (apt-get install clang) and atheris (pip install atheris).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
rm -rf build/fuzz build/fuzz-tmp
mkdir -p build/fuzz
CC=clang LDSHARED="clang -shared" CFLAGS="-fsanitize=fuzzer-no-link,address -g" \
  LDFLAGS="-fsanitize=address" TELECOM_ONLY=rtp,aead,jitter \
  "$PY" setup.py -q build_ext --build-lib build/fuzz --build-temp build/fuzz-tmp
ASAN_LIB=$("$PY" -c 'import atheris, os; print(os.path.join(atheris.path(), "asan_with_fuzzer.so"))')
echo "run with:"
echo "  LD_PRELOAD=$ASAN_LIB ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1 TELECOM_FUZZ_LIB=build/fuzz/telecom/_fast \\"
echo "    $PY fuzz/run.py fuzz/corpus/wire -max_total_time=300"
