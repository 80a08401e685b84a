"""What the master says at start about the file descriptor limit, for a given config."""

from __future__ import annotations

from proxyd.config.models import GatewayConfig
from proxyd.fdlimit import OWN_FDS, limit_warnings, needed_per_worker


def config(max_connections: int) -> GatewayConfig:
    return GatewayConfig.model_validate({"server": {
        "listen": ["127.0.0.1:0"], "limits": {"max_connections": max_connections}}})


def test_need_is_a_client_and_an_upstream_per_connection() -> None:
    assert needed_per_worker(config(1000)) == 2000 + OWN_FDS
    assert needed_per_worker(config(0)) is None  # no cap: nothing to compare with


def test_a_limit_that_fits_says_nothing() -> None:
    assert limit_warnings(config(1000), 2000 + OWN_FDS, workers=4, file_max=10**9) == []
    assert limit_warnings(config(0), 16, workers=4, file_max=16) == []


def test_a_short_limit_says_how_short() -> None:
    [warning] = limit_warnings(config(1000), 1024, workers=4, file_max=10**9)
    assert "RLIMIT_NOFILE) is 1024, below the 2064 a worker may need" in warning
    assert "server.limits.max_connections 1000" in warning


def test_the_system_table_counts_every_worker() -> None:
    [warning] = limit_warnings(config(1000), 10**6, workers=4, file_max=8000)
    assert warning.startswith("fs.file-max is 8000, below the 8256 descriptors 4 workers")
