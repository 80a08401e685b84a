"""Configuration: the config file's models, its loader and its checks (docs/architecture.md)."""

from proxyd.config.loader import (
    load_config,
    load_config_text,
    load_config_text_with_warnings,
    load_config_with_warnings,
)
from proxyd.config.models import GatewayConfig
from proxyd.errors import ConfigError, ConfigIssue

__all__ = [
    "ConfigError",
    "ConfigIssue",
    "GatewayConfig",
    "load_config",
    "load_config_text",
    "load_config_text_with_warnings",
    "load_config_with_warnings",
]
