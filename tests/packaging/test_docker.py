"""packaging/Dockerfile: exec-form PID 1, non-root, the container config; README says the same."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

import pytest

from proxyd.config import load_config
from proxyd.config.models import Server
from proxyd.errors import ConfigError
from proxyd.master import KILL_GRACE
from tests.packaging._parse import (
    DOCKERFILE,
    PACKAGING,
    README,
    REPO,
    UNIT,
    container_command,
    dockerfile_instructions,
    markdown_section,
    parse_unit,
    shell_commands,
)

IMAGE_CONFIG = PACKAGING / "docker" / "gateway.yaml"
TOKEN_ENV = {"PROXYD_ADMIN_TOKEN": "test-token"}


def instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def args_of(name: str) -> list[str]:
    return [args for instruction, args in instructions() if instruction == name]


def test_base_user_and_ports() -> None:
    assert args_of("FROM") == ["python:3.11-slim"]
    users = args_of("USER")
    assert users and users[-1] not in ("root", "0")
    assert sorted(" ".join(args_of("EXPOSE")).split()) == ["8080", "9901"]


def test_runs_proxyd_as_pid_1_on_the_image_config() -> None:
    assert container_command() == ["proxyd", "run", "-c", "/etc/proxyd/gateway.yaml"]
    copies = [shlex.split(a) for a in args_of("COPY")]
    assert ["packaging/docker/gateway.yaml", "/etc/proxyd/gateway.yaml"] in copies
    for *sources, _dest in copies:
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the build context"


def test_same_command_as_the_systemd_unit() -> None:
    exec_start = parse_unit(UNIT.read_text())["Service"]["ExecStart"][0].split()
    assert container_command()[1:] == exec_start[1:]


def test_healthcheck_asks_the_traffic_port() -> None:
    (healthcheck,) = args_of("HEALTHCHECK")
    assert "curl" not in healthcheck and "wget" not in healthcheck  # not in -slim
    url = re.search(r"http://127\.0\.0\.1:(\d+)/health\b", healthcheck)
    assert url, healthcheck
    config = load_config(IMAGE_CONFIG, env=TOKEN_ENV)
    assert int(url.group(1)) in {a.port for a in config.server.listen}
    code = re.search(r'CMD \["python", "-c", "(.*)"\]', healthcheck)
    assert code, "HEALTHCHECK should be exec form running python -c"
    compile(code.group(1), "HEALTHCHECK", "exec")


def test_image_config_listens_on_all_interfaces_and_requires_a_token() -> None:
    config = load_config(IMAGE_CONFIG, env=TOKEN_ENV)
    assert {a.host for a in config.server.listen} == {"0.0.0.0"}
    assert config.admin.listen.host == "0.0.0.0"
    assert config.admin.token == "test-token"
    with pytest.raises(ConfigError, match="PROXYD_ADMIN_TOKEN"):
        load_config(IMAGE_CONFIG, env={})


def test_image_config_passes_check_config() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxyd", "check-config", "-c", str(IMAGE_CONFIG)],
        capture_output=True, text=True, timeout=60, check=False,
        env={"PATH": "/usr/bin:/bin", **TOKEN_ENV},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_docker_section_matches_the_dockerfile() -> None:
    section = markdown_section(README.read_text(), "### Docker")
    commands = shell_commands(section)
    builds = [c for c in commands if c[:2] == ["docker", "build"]]
    runs = [c for c in commands if c[:2] == ["docker", "run"]]
    assert builds and runs, section
    build = builds[0]
    assert REPO / build[build.index("-f") + 1] == DOCKERFILE
    tag = build[build.index("-t") + 1]
    # The README's `docker run` adds no command: the image's own ENTRYPOINT runs.
    run = runs[0]
    assert run[-1] == tag, f"docker run should end with the image, got {run}"
    # docker stop must wait longer than the drain (Docker's default is 10s).
    stop_timeout = int(run[run.index("--stop-timeout") + 1])
    assert stop_timeout > Server().drain_timeout + KILL_GRACE
    # And the command the README says the container runs is the ENTRYPOINT, word for word.
    stated = [shlex.split(m) for m in re.findall(r"`(proxyd run [^`]*)`", section)]
    assert stated and all(s == container_command() for s in stated), stated


def test_dockerignore_keeps_what_copy_needs() -> None:
    ignore = (PACKAGING / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:] for line in ignore if line.startswith("!")}
    for args in args_of("COPY"):
        *sources, _dest = shlex.split(args)
        for source in sources:
            assert source in kept or f"{source}/**" in kept, f"{source} is excluded"


def test_docker_build(tmp_path: object) -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker not installed - image not built")
    info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30,
                          check=False)
    if info.returncode != 0:
        pytest.skip("no reachable Docker daemon - image not built")
    result = subprocess.run(
        [docker, "build", "-q", "-f", str(DOCKERFILE), "-t", "proxyd-packaging-test", str(REPO)],
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
