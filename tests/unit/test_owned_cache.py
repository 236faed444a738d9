"""nodeproxy.owned_cache.OwnedCache: bounded in all; a peer that floods it with distinct
keys forgets its own entries, never another's."""

from __future__ import annotations

import random

from nodeproxy.owned_cache import OwnedCache


def test_a_flooding_owner_evicts_only_its_own_entries() -> None:
    cache: OwnedCache[str] = OwnedCache(100)
    for i in range(30):
        cache.put("victim-a", f"/a/{i}", f"a{i}")
        cache.put("victim-b", f"/b/{i}", f"b{i}")
    for i in range(10_000):
        cache.put("flooder", f"/evil/{i}", "x")
        assert cache.size <= 100
        assert cache.held_by("victim-a") == 30 and cache.held_by("victim-b") == 30
    assert all(cache.get("victim-a", f"/a/{i}") == f"a{i}" for i in range(30))
    assert all(cache.get("victim-b", f"/b/{i}") == f"b{i}" for i in range(30))
    assert cache.get("flooder", "/evil/0") is None  # long forgotten
    assert cache.get("flooder", "/evil/9999") == "x"  # the latest is kept
    assert cache.get("victim-a", "/b/0") is None  # an entry is its owner's alone


def test_a_replaced_entry_is_not_counted_twice_and_the_bound_always_holds() -> None:
    rng = random.Random(7)
    cache: OwnedCache[int] = OwnedCache(64)
    model: dict[tuple[str, int], int] = {}
    for step in range(20_000):
        owner, key = f"pod-{rng.randrange(6)}", rng.randrange(40)
        cache.put(owner, key, step)
        model[(owner, key)] = step
        assert cache.size == len(cache.keys()) <= 64
        assert cache.get(owner, key) == step
        # what is still held is what was last put under that owner and key
        probe_owner, probe_key = f"pod-{rng.randrange(6)}", rng.randrange(40)
        held = cache.get(probe_owner, probe_key)
        assert held is None or held == model[(probe_owner, probe_key)]
