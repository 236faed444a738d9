"""Not a target: what the bounded-run test feeds its judge to prove a finding fails the
run (an input holding ``boom`` breaks this "invariant")."""

from __future__ import annotations


def check(data: bytes) -> None:
    assert b"boom" not in data, "the self-test's planted finding"
