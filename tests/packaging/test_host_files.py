"""packaging/sysctl.d and packaging/logrotate.d."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from proxyd.config.models import GatewayConfig
from tests.packaging._parse import PACKAGING

SYSCTL = PACKAGING / "sysctl.d" / "90-proxyd.conf"
LOGROTATE = PACKAGING / "logrotate.d" / "proxyd"


def sysctl_settings() -> dict[str, str]:
    settings: dict[str, str] = {}
    for line in SYSCTL.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not key = value: {line!r}"
        assert key.strip() not in settings, f"{key.strip()} set twice"
        settings[key.strip()] = value.strip()
    return settings


def test_sysctl_values() -> None:
    s = sysctl_settings()
    assert s["net.ipv4.tcp_migrate_req"] == "1"  # fewer workers: a retired socket's queue migrates
    assert int(s["net.core.somaxconn"]) >= 4096  # >= the default server.backlog
    assert int(s["net.ipv4.tcp_max_syn_backlog"]) >= 4096
    assert int(s["net.core.netdev_max_backlog"]) >= 1000
    assert s["net.ipv4.tcp_tw_reuse"] == "1"
    assert 5 <= int(s["net.ipv4.tcp_fin_timeout"]) <= 60
    low, high = map(int, s["net.ipv4.ip_local_port_range"].split())
    assert 1024 <= low < high <= 65535
    # proxyd's default listen ports stay outside the ephemeral range (no accidental holder).
    config = GatewayConfig()
    reserved = {int(p) for p in s.get("net.ipv4.ip_local_reserved_ports", "").split(",") if p}
    for port in [*(a.port for a in config.server.listen), config.admin.listen.port]:
        assert port < low or port in reserved


def test_sysctl_never_lowers_a_system_wide_maximum() -> None:
    # A sysctl.d file sets, it cannot raise: a maximum the kernel or systemd sizes at boot
    # (fs.file-max is LONG_MAX under systemd >= 240) would be lowered on most hosts.
    sized_at_boot = {"fs.file-max", "fs.nr_open", "kernel.pid_max", "kernel.threads-max"}
    assert not sized_at_boot & set(sysctl_settings())
    # The comment that explains it gives a command that only ever raises it.
    text = SYSCTL.read_text()
    assert '[ "$(sysctl -n fs.file-max)" -lt 2097152 ] &&' in text


def test_sysctl_keys_exist_in_this_kernel() -> None:
    missing = [k for k in sysctl_settings()
               if not Path("/proc/sys", *k.split(".")).exists()]
    # Some net.core keys are hidden inside a container's network namespace.
    known_hidden = {"net.core.netdev_max_backlog", "net.ipv4.tcp_migrate_req"}
    unexpected = [k for k in missing if k not in known_hidden]
    assert not unexpected, f"unknown sysctl keys (typo?): {unexpected}"
    if missing:
        pytest.skip(f"not visible here (namespace or kernel < 5.14): {missing}")


def test_logrotate_directives() -> None:
    text = LOGROTATE.read_text()
    words = {line.strip() for line in text.splitlines()
             if line.strip() and not line.strip().startswith("#")}
    for directive in ("daily", "rotate 14", "compress", "delaycompress", "missingok",
                      "notifempty", "postrotate", "endscript"):
        assert directive in words, directive
    assert re.search(r"^/var/log/proxyd/\*\.log \{$", text, re.M)
    assert "systemctl kill -s USR1 --kill-who=main proxyd.service" in text


def test_logrotate_parses_it(tmp_path: Path) -> None:
    logrotate = shutil.which("logrotate") or shutil.which("logrotate", path="/usr/sbin:/sbin")
    if logrotate is None:
        pytest.skip("logrotate not installed (apt-get install logrotate) - file not parsed")
    result = subprocess.run(
        [logrotate, "--debug", "--state", str(tmp_path / "state"), str(LOGROTATE)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "error" not in output.lower(), output
    assert "rotating pattern: /var/log/proxyd/*.log" in output
