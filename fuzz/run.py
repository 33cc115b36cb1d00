"""Run the wire fuzzer with atheris (coverage-guided). Not part of the test run.

    .venv/bin/python fuzz/run.py fuzz/corpus/wire -runs=200000        # a longer run
    .venv/bin/python fuzz/run.py fuzz/corpus/wire -max_total_time=60

Python-level coverage comes from atheris' bytecode instrumentation of the twin and the targets. For
coverage of the compiled parsers, build them instrumented first (``fuzz/build_instrumented.sh``) and
run with the environment it prints. New interesting inputs are added to the corpus directory; keep the
small ones in git (the test suite replays them).
"""

import sys

import atheris

# fuzz/ is sys.path[0] when this file is run as a script.
with atheris.instrument_imports(include=["wire_targets", "telecom"]):
    from wire_targets import one_input


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
