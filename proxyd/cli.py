"""The ``proxyd`` command line: one click group, one function per command."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from proxyd import __version__, build
from proxyd.admin_client import (
    AdminUnreachable,
    admin_request,
    format_status,
    wait_for_reload,
    wait_for_upgrade,
)
from proxyd.config import GatewayConfig, load_config_with_warnings
from proxyd.config.summary import format_summary, summarize
from proxyd.errors import EXIT_CONFIG, EXIT_OK, EXIT_RUNTIME, ConfigError, ConfigIssue

DEFAULT_CONFIG = "/etc/proxyd/gateway.yaml"
# How long `reload --wait` waits for the result: the master may take its parse deadline (30 s)
# and then its workers' READY deadline (30 s) to decide.
RELOAD_WAIT = 90.0
# How long `upgrade` waits: the new master's start (its config, then its workers' READY) is
# given up by the old one after 90 s; then the new one takes the admin port over.
UPGRADE_WAIT = 120.0

config_option = click.option(
    "-c", "--config", "config_path",
    envvar="PROXYD_CONFIG", default=DEFAULT_CONFIG, show_default=True, show_envvar=True,
    # No exists=True: a missing file is a config error (exit 1, our message), not click usage.
    type=click.Path(dir_okay=False),
    help="Path to the gateway YAML file.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="proxyd",
                      message=f"%(prog)s %(version)s ({build()} build)")
def main() -> None:
    """proxyd: a declarative, YAML-configured reverse proxy daemon."""


def _issue_json(issue: ConfigIssue) -> dict[str, Any]:
    data = asdict(issue)
    return {"file": data["file"], "line": data["line"], "column": data["column"],
            "key": data["key_path"], "message": data["message"]}


def _print_errors(exc: ConfigError) -> None:
    # Exactly one `file:line:col: key: message` line per error: editors and CI parse these.
    for issue in exc.issues:
        click.echo(str(issue), err=True)


def _load_for_serving(config_path: str) -> tuple[GatewayConfig, list[ConfigIssue]]:
    """The config as ``run`` and ``check-config`` need it: valid, and its TLS certificate and
    key files loadable (the one check that reads other files)."""
    from proxyd.listener_tls import file_issues

    config, warnings = load_config_with_warnings(config_path)
    if issues := file_issues(config, config_path):
        raise ConfigError(issues)
    return config, warnings


admin_option = click.option(
    "--admin", "admin_url", envvar="PROXYD_ADMIN_URL", default=None,
    help="Admin base URL (default: the address the master serving the config file recorded "
         "when it started or last reloaded, else admin.listen of the file, else "
         "127.0.0.1:9901).",
)
token_option = click.option("--token", envvar="PROXYD_ADMIN_TOKEN", default="",
                            show_envvar=True, help="Admin bearer token.")


def _admin_base(admin_url: str | None, config_path: str) -> str:
    """Where the instance serving ``config_path`` listens for admin requests. What its master
    recorded comes before the file: the file may be the rejected edit being reloaded, or
    name an address the running instance does not (yet) listen on."""
    if admin_url:
        return admin_url.rstrip("/") if "://" in admin_url else f"http://{admin_url}"
    from proxyd.runtime import read_state

    if (state := read_state(config_path)) is not None:
        return f"http://{state['admin']}"
    try:
        config, _ = load_config_with_warnings(config_path)
        return f"http://{config.admin.listen}"
    except (ConfigError, OSError):
        return "http://127.0.0.1:9901"


def _unauthorized() -> None:
    click.echo("proxyd: the admin port answered 401 unauthorized: give its token with --token "
               "or PROXYD_ADMIN_TOKEN", err=True)
    sys.exit(EXIT_RUNTIME)


@main.command("check-config")
@config_option
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="json: machine-readable result on stdout.")
@click.option("--diff", "against_running", is_flag=True,
              help="Also say what the file changes against the running configuration (from "
                   "the admin port; exit 3 when it cannot be reached).")
@admin_option
@token_option
def check_config(config_path: str, fmt: str, against_running: bool, admin_url: str | None,
                 token: str) -> None:
    """Validate a config file and summarise what it would run; exit 1 on any error."""
    try:
        config, warnings = _load_for_serving(config_path)
    except ConfigError as exc:
        if fmt == "json":
            click.echo(json.dumps({"ok": False, "errors": [_issue_json(i) for i in exc.issues],
                                   "warnings": [], "summary": None}, indent=2))
        else:
            _print_errors(exc)
        sys.exit(EXIT_CONFIG)
    changes = _running_diff(config, config_path, admin_url, token) if against_running else None
    if fmt == "json":
        click.echo(json.dumps({"ok": True, "errors": [],
                               "warnings": [_issue_json(w) for w in warnings],
                               "summary": summarize(config),
                               **({"diff": changes} if changes is not None else {})}, indent=2))
    else:
        click.echo(format_summary(config, config_path, warnings))
        if changes is not None:
            from proxyd.config.diff import describe

            click.echo(f"against the running configuration (generation "
                       f"{changes['generation']}): {describe(changes)}")


def _running_diff(config: GatewayConfig, config_path: str, admin_url: str | None,
                  token: str) -> dict[str, Any]:
    from proxyd.config.diff import comparable, diff

    base = _admin_base(admin_url, config_path)
    try:
        code, running = admin_request(f"{base}/config", token=token, timeout=10)
    except AdminUnreachable as exc:
        click.echo(f"proxyd: no running configuration to compare with: {exc}", err=True)
        sys.exit(EXIT_RUNTIME)
    if code == 401:
        _unauthorized()
    if code != 200 or not isinstance(running.get("config"), dict):
        click.echo(f"proxyd: {base}/config answered {code}", err=True)
        sys.exit(EXIT_RUNTIME)
    return {**diff(running["config"], comparable(config)), "generation": running["generation"],
            "running_sha256": running.get("sha256")}


@main.command()
def schema() -> None:
    """Print the config's JSON Schema (for editor completion and validation)."""
    from proxyd.config.schema import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@main.command("config-reference")
def config_reference() -> None:
    """Print the configuration reference (Markdown), as docs/configuration.md holds it."""
    from proxyd.config.reference import render

    click.echo(render(), nl=False)


@main.command()
@config_option
@click.option("--pid-file", type=click.Path(dir_okay=False), help="Write the master's pid here.")
def run(config_path: str, pid_file: str | None) -> None:
    """Load the config and serve traffic in the foreground (master + workers)."""
    try:
        config, warnings = _load_for_serving(config_path)
    except ConfigError as exc:
        _print_errors(exc)
        sys.exit(EXIT_CONFIG)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    # Imported here: the data plane (uvloop, httptools) is not needed to check a config.
    from proxyd.master import run_master

    try:
        # Absolute: reloads and upgrades must find the files whatever the working directory
        # becomes. The master writes the pid file (an upgrade's new master, once it took over)
        # and removes it while it still names it.
        code = run_master(os.path.abspath(config_path), config,
                          os.path.abspath(pid_file) if pid_file else None)
    except OSError as exc:
        click.echo(f"proxyd: cannot start: {exc}", err=True)
        code = EXIT_RUNTIME
    sys.exit(code)




@main.command()
@config_option
@admin_option
@token_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def status(config_path: str, admin_url: str | None, token: str, as_json: bool) -> None:
    """Show the running instance's status from the admin port."""
    base = _admin_base(admin_url, config_path)
    try:
        code, data = admin_request(f"{base}/status", token=token)
    except AdminUnreachable as exc:
        click.echo(f"proxyd: {exc}", err=True)
        sys.exit(EXIT_RUNTIME)
    if code == 401:
        _unauthorized()
    if code != 200:
        click.echo(f"proxyd: {base}/status answered {code}: {data.get('error', data)}",
                   err=True)
        sys.exit(EXIT_RUNTIME)
    click.echo(json.dumps(data, indent=2) if as_json else format_status(data))


@main.command()
@config_option
@admin_option
@token_option
@click.option("--wait/--no-wait", default=False,
              help="Wait for the result; exit 1 if the new config was rejected.")
@click.option("--pid-file", type=click.Path(dir_okay=False),
              help="Send SIGHUP to the pid in this file instead of using the admin port.")
def reload(config_path: str, admin_url: str | None, token: str, wait: bool,
           pid_file: str | None) -> None:
    """Reload the configuration without dropping connections."""
    base = _admin_base(admin_url, config_path)
    if pid_file:
        before = None
        if wait:
            with contextlib.suppress(AdminUnreachable):
                before = admin_request(f"{base}/status", token=token)[1].get(
                    "last_reload", {}).get("at")
        os.kill(int(Path(pid_file).read_text().strip()), signal.SIGHUP)
        if not wait:
            return
        result = wait_for_reload(base, before, timeout=RELOAD_WAIT, token=token)
    else:
        try:
            code, result = admin_request(f"{base}/reload?wait={int(wait)}", method="POST",
                                         token=token, timeout=RELOAD_WAIT)
        except AdminUnreachable as exc:
            click.echo(f"proxyd: {exc}", err=True)
            sys.exit(EXIT_RUNTIME)
        if code == 401:
            _unauthorized()
    if not wait:
        click.echo("reload requested")
        return
    if result.get("ok"):
        from proxyd.config.diff import describe

        changes = result.get("changes")
        click.echo(f"reloaded: generation {result.get('generation')}"
                   + (f": {describe(changes)}" if isinstance(changes, dict) else ""))
        return
    click.echo(f"reload rejected, old configuration still serving:\n{result.get('error')}",
               err=True)
    sys.exit(EXIT_CONFIG)


@main.command()
@config_option
@admin_option
@token_option
@click.option("--pid-file", type=click.Path(dir_okay=False),
              help="Send SIGUSR2 to the pid in this file instead of using the admin port.")
def upgrade(config_path: str, admin_url: str | None, token: str, pid_file: str | None) -> None:
    """Replace the running master with one from the code installed now, without dropping a
    connection; exit 1 if the new one cannot start (the running one keeps serving)."""
    base = _admin_base(admin_url, config_path)
    try:
        before = admin_request(f"{base}/status", token=token, timeout=10)[1]
    except AdminUnreachable as exc:
        click.echo(f"proxyd: {exc}", err=True)
        sys.exit(EXIT_RUNTIME)
    if pid_file:
        seen = (before.get("upgrades") or {}).get("last") or {}
        os.kill(int(Path(pid_file).read_text().strip()), signal.SIGUSR2)
        result = wait_for_upgrade(base, before.get("pid"), seen.get("at"), timeout=UPGRADE_WAIT,
                                  token=token)
    else:
        try:
            code, result = admin_request(f"{base}/upgrade", method="POST", token=token,
                                         timeout=UPGRADE_WAIT)
        except AdminUnreachable as exc:
            click.echo(f"proxyd: {exc}", err=True)
            sys.exit(EXIT_RUNTIME)
        if code == 401:
            _unauthorized()
        if result.get("ok"):
            result = wait_for_upgrade(base, before.get("pid"), None, timeout=UPGRADE_WAIT,
                                      token=token, new_pid=result.get("pid"))
    if not result.get("ok"):
        click.echo(f"upgrade failed, the running master keeps serving:\n{result.get('error')}",
                   err=True)
        sys.exit(EXIT_CONFIG)
    click.echo(f"upgraded: proxyd {before.get('version')} (pid {before.get('pid')}) → "
               f"proxyd {result.get('version')} (pid {result.get('pid')})")


@main.command()
@config_option
@click.argument("method")
@click.argument("url")
@click.option("-H", "--header", "headers", multiple=True, help="'Name: value', repeatable.")
@click.option("--client-ip", default="127.0.0.1", show_default=True,
              help="The peer address (for rate-limit keys).")
@click.option("--json", "as_json", is_flag=True)
def explain(config_path: str, method: str, url: str, headers: tuple[str, ...],
            client_ip: str, as_json: bool) -> None:
    """Show the route, chain, cache and rate-limit keys and upstream a request would get
    (nothing is sent)."""
    from proxyd.explain import explain as run_explain
    from proxyd.explain import format_explain

    try:
        config, _ = load_config_with_warnings(config_path)
    except ConfigError as exc:
        _print_errors(exc)
        sys.exit(EXIT_CONFIG)
    pairs = []
    for header in headers:
        name, sep, value = header.partition(":")
        if not sep:
            raise click.BadParameter(f"expected 'Name: value', got {header!r}", param_hint="-H")
        pairs.append((name.strip(), value.strip()))
    ok, result = run_explain(config, method, url, pairs, client_ip=client_ip)
    from proxyd.config.redact import redact_value

    result = redact_value(result, config)  # e.g. a URL password; never printed
    click.echo(json.dumps(result, indent=2) if as_json else format_explain(ok, result))
    sys.exit(EXIT_OK if ok else EXIT_CONFIG)


@main.command("hash-password")
@click.option("--scheme", type=click.Choice(["bcrypt", "argon2id", "sha256"]), default="bcrypt",
              show_default=True,
              help="bcrypt or argon2id: a basic_auth user's hash; sha256: an api_key key's.")
@click.option("--rounds", type=click.IntRange(4, 31), default=12, show_default=True,
              help="bcrypt's cost (each step doubles the time of a check).")
@click.option("--stdin", "from_stdin", is_flag=True,
              help="Read the secret from the first line of stdin instead of prompting.")
def hash_password(scheme: str, rounds: int, from_stdin: bool) -> None:
    """Print the hash of a password (basic_auth) or of an API key (api_key) for the config;
    the secret itself is never written anywhere."""
    import hashlib

    from proxyd.middleware.access.passwords import make_hash

    if from_stdin:
        secret = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    else:
        secret = click.prompt("Secret", hide_input=True, confirmation_prompt=True,
                              err=True)
    if not secret:
        click.echo("proxyd: an empty secret", err=True)
        sys.exit(EXIT_CONFIG)
    if scheme == "sha256":
        click.echo("sha256:" + hashlib.sha256(secret.encode()).hexdigest())
        return
    try:
        click.echo(make_hash(secret, scheme, rounds))
    except ValueError as exc:
        click.echo(f"proxyd: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
