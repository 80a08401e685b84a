"""The ``proxyd`` command line: one click group, one function per command."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Any

import click

from proxyd import __version__
from proxyd.config import GatewayConfig, load_config_with_warnings
from proxyd.config.summary import format_summary, summarize
from proxyd.errors import EXIT_CONFIG, ConfigError, ConfigIssue

DEFAULT_CONFIG = "/etc/proxyd/gateway.yaml"

config_option = click.option(
    "-c", "--config", "config_path",
    envvar="PROXYD_CONFIG", default=DEFAULT_CONFIG, show_default=True, show_envvar=True,
    # No exists=True: a missing file is a config error (exit 1, our message), not click usage.
    type=click.Path(dir_okay=False),
    help="Path to the gateway YAML file.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="proxyd")
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


@main.command("check-config")
@config_option
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="json: machine-readable result on stdout.")
def check_config(config_path: str, fmt: str) -> None:
    """Validate a config file and summarise what it would run; exit 1 on any error."""
    try:
        config, warnings = load_config_with_warnings(config_path)
    except ConfigError as exc:
        if fmt == "json":
            click.echo(json.dumps({"ok": False, "errors": [_issue_json(i) for i in exc.issues],
                                   "warnings": [], "summary": None}, indent=2))
        else:
            _print_errors(exc)
        sys.exit(EXIT_CONFIG)
    if fmt == "json":
        click.echo(json.dumps({"ok": True, "errors": [],
                               "warnings": [_issue_json(w) for w in warnings],
                               "summary": summarize(config)}, indent=2))
    else:
        click.echo(format_summary(config, config_path, warnings))


@main.command()
def schema() -> None:
    """Print the config's JSON Schema (for editor completion and validation)."""
    document = {"$schema": "https://json-schema.org/draft/2020-12/schema",
                "title": "proxyd gateway configuration",
                **GatewayConfig.model_json_schema()}
    click.echo(json.dumps(document, indent=2))


@main.command()
@config_option
def run(config_path: str) -> None:
    """Load the config and serve traffic in the foreground."""
    try:
        config, warnings = load_config_with_warnings(config_path)
    except ConfigError as exc:
        _print_errors(exc)
        sys.exit(EXIT_CONFIG)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    # Imported here: the data plane (uvloop, httptools) is not needed to check a config.
    from proxyd.worker import run_single

    run_single(config, config_path)
