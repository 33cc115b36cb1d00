"""Run a fuzz target with atheris (coverage-guided). Not part of the test run.

    .venv/bin/python fuzz/run.py [wire|jitter] CORPUS_DIR [libFuzzer options]
    .venv/bin/python fuzz/run.py fuzz/corpus/wire -runs=200000             # wire is the default
    .venv/bin/python fuzz/run.py jitter fuzz/corpus/jitter -max_total_time=60

Targets: ``wire`` (fuzz/wire_targets.py: RTP/RTCP, header extensions, padding, rtpsize AEAD open,
compiled vs twin) and ``jitter`` (fuzz/jitter_targets.py: push/pop programs, compiled vs twin).
Python-level coverage comes from atheris' bytecode instrumentation of the twins and the targets. For
coverage of the compiled code, build it instrumented first (``fuzz/build_instrumented.sh``) and run
with the environment it prints. New interesting inputs are added to the corpus directory; keep the
small ones in git (the test suite replays them).
"""

import importlib
import sys

import atheris

TARGETS = {"wire": "wire_targets", "jitter": "jitter_targets"}


def main() -> None:
    name = "wire"
    if len(sys.argv) > 1 and sys.argv[1] in TARGETS:
        name = sys.argv.pop(1)
    # fuzz/ is sys.path[0] when this file is run as a script.
    with atheris.instrument_imports(include=[TARGETS[name], "telecom"]):
        module = importlib.import_module(TARGETS[name])
    atheris.Setup(sys.argv, module.one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
