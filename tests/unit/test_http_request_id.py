"""The id a request gets when it arrives without x-request-id: a version-4 UUID drawn
from the proxy's PRNG, formatted without building a uuid.UUID per request."""

from __future__ import annotations

import random
import uuid

from nodeproxy.http.handler import request_id


def test_the_id_is_exactly_the_uuid_module_s_version_4_form_of_the_same_bits():
    draws = random.Random(18)
    samples = [0, (1 << 128) - 1, 1 << 127, 0xFFFF << 64, 0xF000 << 64, 0xC000 << 48]
    samples += [draws.getrandbits(128) for _ in range(20_000)]
    for bits in samples:
        made = request_id(bits)
        assert made == str(uuid.UUID(int=bits, version=4))
        parsed = uuid.UUID(made)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_different_draws_give_different_ids():
    draws = random.Random(7)
    ids = {request_id(draws.getrandbits(128)) for _ in range(10_000)}
    assert len(ids) == 10_000
