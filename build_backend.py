"""setuptools' build backend, with the project's runtime dependencies added to the build
environment: setup.py compiles the L7 request path with mypyc, and mypyc must see the
classes those modules extend and use as they are at run time (a base class it cannot
see is compiled as if it were `object`, and the daemon crashes)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 - the rest of the backend, unchanged


def _dependencies() -> list[str]:
    pyproject = tomllib.loads(Path(__file__).with_name("pyproject.toml").read_text())
    return list(pyproject["project"]["dependencies"])


def get_requires_for_build_wheel(config_settings: dict | None = None) -> list[str]:
    return _setuptools.get_requires_for_build_wheel(config_settings) + _dependencies()


def get_requires_for_build_editable(config_settings: dict | None = None) -> list[str]:
    return _setuptools.get_requires_for_build_editable(config_settings) + _dependencies()
