"""The fuzz targets of ``fuzz/`` in the normal test run: the kept corpus is replayed, hypothesis
throws fresh bytes at the same differential checks, and a few seconds of coverage-guided atheris
run when atheris is installed. The long runs are ``fuzz/run.py`` (see its docstring)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

FUZZ = pathlib.Path(__file__).resolve().parent.parent / "fuzz"
sys.path.insert(0, str(FUZZ))

import jitter_targets  # noqa: E402
import wire_targets  # noqa: E402

TARGETS = {"wire": wire_targets, "jitter": jitter_targets}
CORPUS = [(name, p) for name in TARGETS for p in sorted((FUZZ / "corpus" / name).iterdir())]


def test_the_corpus_is_kept():
    for name in TARGETS:
        assert sum(1 for n, _ in CORPUS if n == name) >= 10, name


@pytest.mark.parametrize("target,path", CORPUS, ids=lambda p: p if isinstance(p, str) else p.name[:12])
def test_corpus_input(target, path):
    TARGETS[target].one_input(path.read_bytes())


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=2, max_size=600))
def test_jitter_buffer_fast_and_twin_agree_on_any_program(data):
    jitter_targets.one_input(data)


def _rtp_like():
    # Mostly packet-shaped bytes (version 2, a payload type, a length that reaches the fields) so
    # the parsers get past their first checks; raw bytes as well.
    first = st.integers(0x80, 0xBF)
    return st.one_of(
        st.binary(max_size=64),
        st.tuples(first, st.integers(0, 255), st.binary(min_size=10, max_size=200)).map(
            lambda t: bytes([t[0], t[1]]) + t[2]),
    )


@settings(max_examples=400, deadline=None)
@given(_rtp_like())
def test_fast_and_twin_agree_on_any_bytes(data):
    wire_targets.one_input(data)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_a_short_coverage_guided_run(tmp_path, target):
    pytest.importorskip("atheris", reason="atheris not installed (pip install atheris)")
    # A copy of the corpus, so the run's new inputs do not land in the repository.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, p in CORPUS:
        if name == target:
            (corpus / p.name).write_bytes(p.read_bytes())
    env = dict(os.environ, PYTHONPATH=str(FUZZ))
    env.pop("TELECOM_FUZZ_LIB", None)
    result = subprocess.run([sys.executable, str(FUZZ / "run.py"), target, str(corpus), "-max_total_time=4",
                             "-print_final_stats=1"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done" in result.stderr and "stat::number_of_executed_units" in result.stderr
