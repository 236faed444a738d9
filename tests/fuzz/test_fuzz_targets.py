"""The fuzz targets in the normal suite: every seed passes its target's checks, and each
target runs under atheris for a fixed number of inputs (a bounded run; ``make fuzz`` runs
them for minutes).  A run fails on any finding, and also when the target executed nothing
worth the name: no seed loaded, or no coverage.  See docs/fuzzing.md."""

from __future__ import annotations

import base64
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz import harness
from tests.fuzz.run import TARGETS

REPO = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).parent / "corpus"
# Runs per target: about 3-6 s each on a busy 2-core machine, the six together well
# under a minute with interpreter start and instrumentation.  The seeds count as runs.
RUNS = {
    "fuzz_h1_server": 2000,
    "fuzz_h2_server": 500,
    "fuzz_hbone_server": 300,
    "fuzz_config_loader": 100,
    "fuzz_cni_netconf": 4000,
    "fuzz_authorization": 5000,
}
MAX_SECONDS = 20  # a cap per target on a machine slower than expected (not a failure)
MIN_COVERAGE = 50  # instrumented edges a run must reach; a target that returns at once does not


def seeds(target: str) -> list[Path]:
    directory = CORPUS / target
    return sorted(p for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []


def test_every_target_has_runs_and_seeds() -> None:
    assert set(RUNS) == set(TARGETS)
    for target in TARGETS:
        assert len(seeds(target)) >= 3, f"{target}: the seed corpus is (nearly) empty"


@pytest.mark.parametrize("target", TARGETS)
def test_seeds_pass_the_target_checks(target: str) -> None:
    module = importlib.import_module(f"tests.fuzz.{target}")
    try:
        for seed in seeds(target):
            try:
                module.check(seed.read_bytes())
            except BaseException as e:
                raise AssertionError(f"seed {seed.name} of {target}: {e!r}") from e
    finally:
        harness.close_loop()


def bounded_run(target: str, runs: int, corpus: Path, work: Path) -> tuple[int, str]:
    """python -m tests.fuzz.run TARGET -runs=N with a fresh output corpus and artifacts
    under work; (exit status, libFuzzer's output)."""
    (work / "new").mkdir(parents=True, exist_ok=True)
    artifacts = work / "artifacts"
    artifacts.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.run", target, f"-runs={runs}", "-seed=1",
         f"-max_total_time={MAX_SECONDS}", f"-artifact_prefix={artifacts}/",
         str(work / "new"), str(corpus)],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        errors="replace", timeout=MAX_SECONDS + 120)
    output = proc.stdout + proc.stderr
    for crash in artifacts.iterdir():
        output += f"\n{crash.name} (base64): {base64.b64encode(crash.read_bytes()).decode()}"
    return proc.returncode, output


def judge(target: str, status: int, output: str) -> None:
    """What a bounded run must show: no finding, seeds loaded, coverage, runs done."""
    tail = "\n".join(line for line in output.splitlines()
                     if not line.startswith("INFO: Instrumenting"))[-6000:]
    assert status == 0, f"{target} found a crash or broke an invariant:\n{tail}"
    loaded = re.search(r"seed corpus: files: (\d+)", output)
    assert loaded and int(loaded.group(1)) > 0, f"{target} loaded no seed:\n{tail}"
    coverage = re.search(r"INITED cov: (\d+)", output)
    assert coverage and int(coverage.group(1)) >= MIN_COVERAGE, \
        f"{target} reached almost no code:\n{tail}"
    done = re.search(r"Done (\d+) runs", output)
    assert done and int(done.group(1)) >= int(loaded.group(1)), f"{target}:\n{tail}"


@pytest.mark.parametrize("target", TARGETS)
def test_bounded_fuzz_run(target: str, tmp_path: Path) -> None:
    status, output = bounded_run(target, RUNS[target], CORPUS / target, tmp_path)
    judge(target, status, output)


def test_a_bounded_run_fails_on_an_empty_corpus(tmp_path: Path) -> None:
    """The judge of a bounded run is not fooled by a target that had nothing to run."""
    empty = tmp_path / "empty"
    empty.mkdir()
    status, output = bounded_run("fuzz_cni_netconf", 50, empty, tmp_path / "work")
    with pytest.raises(AssertionError, match="loaded no seed"):
        judge("fuzz_cni_netconf", status, output)


def test_a_bounded_run_fails_on_a_finding(tmp_path: Path) -> None:
    """A seed that breaks an invariant fails the run, and its bytes are reported."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "fine").write_bytes(b"nothing to see")
    (corpus / "planted").write_bytes(b"a boom here")
    status, output = bounded_run("selftest_crash", 50, corpus, tmp_path / "work")
    with pytest.raises(AssertionError, match="found a crash") as failure:
        judge("selftest_crash", status, output)
    assert base64.b64encode(b"a boom here").decode() in str(failure.value)


def test_the_config_seed_is_the_example_node_policy() -> None:
    """The config loader's main seed is config/example-node.yaml as it stands: a field
    added to the example (and so to the loader) reaches the fuzzer as a seed."""
    example = REPO / "config" / "example-node.yaml"
    seed = CORPUS / "fuzz_config_loader" / "example-node.yaml"
    assert seed.read_bytes() == example.read_bytes(), (
        f"{seed} is stale: cp {example.relative_to(REPO)} {seed.relative_to(REPO)}")
