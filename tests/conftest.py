"""Shared test policy: privileged tests fail (never skip) where they cannot run, and no
test module switches the compiled build off for the whole run by importing."""

from __future__ import annotations

import os

import pytest

# The compiled-build switch (nodeproxy/native.py's ENV) as the run was started: `make test`
# runs the suite compiled, then the unit tests with it at "0".
_NATIVE_SWITCH_AT_START = os.environ.get("NODEPROXY_NATIVE")


def pytest_collection_finish(session: pytest.Session) -> None:
    """A module that sets the switch when imported turns the compiled pass pure for every
    test and daemon after it (tests/fuzz/run.py once did): fail the run, naming it."""
    now = os.environ.get("NODEPROXY_NATIVE")
    if now != _NATIVE_SWITCH_AT_START:
        raise pytest.UsageError(
            f"NODEPROXY_NATIVE was {_NATIVE_SWITCH_AT_START!r} when the run started and is "
            f"{now!r} after collection: a test module sets it at import")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("privileged") and os.geteuid() != 0:
        pytest.fail("this test drives a real kernel (BPF, netns, cgroups) and needs root; "
                    "run `make test` as root", pytrace=False)
