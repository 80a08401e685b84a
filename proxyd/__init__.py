"""proxyd: a declarative, YAML-configured reverse proxy and API gateway daemon."""

__version__ = "0.1.0"
