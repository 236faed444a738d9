"""Node policy: model, loading with file:line errors, environment checks."""

from nodeproxy.config.environment import environment_problems
from nodeproxy.config.loader import (
    ConfigError,
    ConfigReadError,
    LoadedConfig,
    format_path,
    load_config,
    parse_config,
)
from nodeproxy.config.model import NodeConfig

__all__ = [
    "ConfigError",
    "ConfigReadError",
    "LoadedConfig",
    "NodeConfig",
    "environment_problems",
    "format_path",
    "load_config",
    "parse_config",
]
