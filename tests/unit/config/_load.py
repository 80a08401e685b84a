"""Loading config text that must fail: the issues as the operator reads them."""

from __future__ import annotations

import pytest

from proxyd.config import ConfigError, load_config_text

ROUTE = "routes:\n  - {name: r, match: {path: /}, respond: {status: 200}}\n"


def lines(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "g.yaml", {})
    return [str(i) for i in info.value.issues]
