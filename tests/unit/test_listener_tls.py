"""TLS listener files: loaded once by the master before a start or reload, every problem a
config issue (check-config, a rejected reload), an encrypted key refused without a prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trustme
from click.testing import CliRunner

from proxyd.cli import main
from proxyd.config import GatewayConfig
from proxyd.listener_tls import file_issues, server_context
from tests.unit.config._load import ROUTE

# -- TLS files ----------------------------------------------------------------------------------


@pytest.fixture
def pems(tmp_path: Path) -> tuple[Path, Path]:
    leaf = trustme.CA().issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


def tls_config(cert: Path | str, key: Path | str, version: str = "1.2") -> GatewayConfig:
    return GatewayConfig.model_validate({"server": {"listen": [
        "127.0.0.1:8080",
        {"address": "127.0.0.1:8443",
         "tls": {"cert": str(cert), "key": str(key), "min_version": version}}]}})


def test_tls_files_load(pems: tuple[Path, Path]) -> None:
    config = tls_config(*pems, version="1.3")
    assert file_issues(config, "g.yaml") == []
    tls = config.server.listen[1].tls  # type: ignore[attr-defined]
    ctx = server_context(tls)
    assert ctx.minimum_version.name == "TLSv1_3"


def test_tls_file_problems_are_config_issues(pems: tuple[Path, Path], tmp_path: Path) -> None:
    cert, key = pems
    other = trustme.CA().issue_cert("127.0.0.1")
    wrong_key = tmp_path / "other-key.pem"
    other.private_key_pem.write_to_path(str(wrong_key))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnope\n")
    for bad_cert, bad_key, expect in [
        (tmp_path / "missing.pem", key, "No such file or directory"),
        (garbage, key, "not a valid PEM"),
        (cert, wrong_key, "not a valid PEM"),
    ]:
        issues = file_issues(tls_config(bad_cert, bad_key), "g.yaml")
        assert len(issues) == 1
        text = str(issues[0])
        assert text.startswith("g.yaml: server.listen[1].tls: 127.0.0.1:8443: cannot load")
        assert expect in text
        assert "PRIVATE KEY" not in text


def test_encrypted_key_is_refused_without_prompting(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    leaf = trustme.CA().issue_cert("127.0.0.1")
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    encrypted = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(b"pw"))
    cert, key_path = tmp_path / "c.pem", tmp_path / "k.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    key_path.write_bytes(encrypted)
    issues = file_issues(tls_config(cert, key_path), "g.yaml")
    assert len(issues) == 1 and "encrypted" in str(issues[0])


def test_check_config_reports_unloadable_tls_files(tmp_path: Path,
                                                   pems: tuple[Path, Path]) -> None:
    cert, key = pems
    path = tmp_path / "g.yaml"
    path.write_text("server:\n  listen:\n    - {address: 127.0.0.1:8443, tls: "
                    f"{{cert: {tmp_path / 'nope.pem'}, key: {key}}}}}\n" + ROUTE)
    result = CliRunner().invoke(main, ["check-config", "-c", str(path)])
    assert result.exit_code == 1 and "server.listen[0].tls" in result.stderr
    path.write_text("server:\n  listen:\n    - {address: 127.0.0.1:8443, tls: "
                    f"{{cert: {cert}, key: {key}}}}}\n" + ROUTE)
    result = CliRunner().invoke(main, ["check-config", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert "127.0.0.1:8443 (TLS 1.2+" in result.stdout
    result = CliRunner().invoke(main, ["check-config", "-c", str(path), "--format", "json"])
    summary = json.loads(result.stdout)["summary"]
    shown = summary["tls"]["127.0.0.1:8443"]
    assert {k: shown[k] for k in ("cert", "key", "min_version")} == {
        "cert": str(cert), "key": str(key), "min_version": "1.2"}
