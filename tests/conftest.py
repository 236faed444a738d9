"""Shared test policy: privileged tests fail (never skip) where they cannot run."""

from __future__ import annotations

import os

import pytest


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("privileged") and os.geteuid() != 0:
        pytest.fail("this test drives a real kernel (BPF, netns, cgroups) and needs root; "
                    "run `make test` as root", pytrace=False)
