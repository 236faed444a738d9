"""Run one fuzz target under atheris (libFuzzer), with nodeproxy instrumented for coverage.

    python -m tests.fuzz.run TARGET [libFuzzer options] [CORPUS_DIR ...]

TARGET is a module of this package (fuzz_h1_server, fuzz_h2_server, ...).  Its code and
the pure-Python protocol libraries it drives (h2, hpack, hyperframe, PyYAML) are
instrumented, so libFuzzer sees their branches; httptools (llhttp) and pydantic-core are
compiled and count only through the Python code around them.  The first corpus directory
also receives the new inputs libFuzzer keeps; give ``-artifact_prefix=DIR/`` to choose
where a crashing input is written.  A target's dictionary of tokens
(``dicts/TARGET.dict``) is passed as ``-dict`` when it exists.  The exit status is
libFuzzer's: 0 when the runs ended without a finding.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

INSTRUMENTED = ["nodeproxy", "h2", "hpack", "hyperframe", "yaml"]
TARGETS = ("fuzz_h1_server", "fuzz_h2_server", "fuzz_hbone_server", "fuzz_config_loader",
           "fuzz_cni_netconf", "fuzz_authorization")


def main(argv: list[str]) -> None:
    # atheris instruments Python bytecode: the compiled build (nodeproxy/native.py) would
    # hide its branches from libFuzzer, so fuzzing runs the sources.  Set here, not at
    # import: the suite imports TARGETS from this module, and an assignment at import set
    # the switch for the whole test process and every daemon it started.
    os.environ["NODEPROXY_NATIVE"] = "0"
    import atheris

    if len(argv) < 2 or argv[1] not in (*TARGETS, "selftest_crash"):
        sys.exit(f"usage: python -m tests.fuzz.run {{{','.join(TARGETS)}}} "
                 "[libFuzzer options] [corpus dirs]")
    # The package root first: it puts native.py's finder (the sources) on sys.meta_path,
    # where atheris then wraps it like the others.
    import nodeproxy  # noqa: F401
    with atheris.instrument_imports(include=INSTRUMENTED):
        target = importlib.import_module(f"tests.fuzz.{argv[1]}")
    options = argv[2:]
    dictionary = Path(__file__).parent / "dicts" / f"{argv[1]}.dict"
    if dictionary.exists() and not any(o.startswith("-dict=") for o in options):
        options.insert(0, f"-dict={dictionary}")
    atheris.Setup([argv[0], *options], target.check)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
