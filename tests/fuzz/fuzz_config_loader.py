"""Fuzz target: the node YAML loader (nodeproxy.config.loader).

One input is the bytes of a node policy file (seeds: config/example-node.yaml and small
valid and invalid files).  It is loaded the way ``nodeproxy run`` and ``nodeproxy
validate`` load it: UTF-8 check, YAML with line marks, pydantic model, cross checks
(the environment checks are left out: they look at this machine).

Invariants:
- the loader returns a LoadedConfig or raises ConfigError, never anything else (a
  RecursionError, a TypeError from an odd YAML node, ...);
- every problem of a ConfigError reads ``node.yaml:LINE: ...`` with LINE a line of the
  file;
- a loaded config survives a round trip: dumped (camelCase, as YAML) and loaded again it
  is the same config.
"""

from __future__ import annotations

import re

import yaml

from nodeproxy.config.loader import ConfigError, parse_config
from nodeproxy.config.model import NodeConfig

SOURCE = "node.yaml"
_PROBLEM = re.compile(r"^node\.yaml:(\d+): \S")


def check(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # load_config reports it before the YAML is read (tested in test_config)
    try:
        loaded = parse_config(text, SOURCE)
    except ConfigError as e:
        assert e.problems, "a ConfigError with no problem"
        last = max(1, len(text.splitlines()) + 1)
        for problem in e.problems:
            match = _PROBLEM.match(problem)
            assert match, f"a problem without file:line: {problem!r}"
            assert 1 <= int(match.group(1)) <= last, f"line out of the file: {problem!r}"
        return
    config = loaded.config
    assert isinstance(config, NodeConfig)
    dumped = yaml.safe_dump(config.model_dump(mode="json", by_alias=True, exclude_unset=True))
    again = parse_config(dumped, SOURCE).config
    assert again == config, "a loaded config changed on a dump and load round trip"
