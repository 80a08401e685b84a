"""YAML → GatewayConfig: positions, interpolation, duplicates, collected errors, suggestions."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxyd.config import (
    ConfigError,
    GatewayConfig,
    load_config,
    load_config_text,
    load_config_text_with_warnings,
)
from proxyd.config.interpolate import interpolate
from proxyd.config.source import format_path
from proxyd.errors import ConfigIssue


def errors(text: str, env: dict[str, str] | None = None) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "g.yaml", env or {})
    return info.value.issues


def lines(text: str, env: dict[str, str] | None = None) -> list[str]:
    return [str(i) for i in errors(text, env)]


ROUTE = "routes:\n  - {name: r, match: {path: /}, respond: {status: 200}}\n"


# --- the happy path ---------------------------------------------------------------------------

def test_empty_file_is_all_defaults() -> None:
    assert load_config_text("", "g.yaml", {}) == GatewayConfig()
    assert load_config_text("# only a comment\n", "g.yaml", {}) == GatewayConfig()


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("server:\n  workers: 3\n" + ROUTE)
    assert load_config(path, env={}).server.workers == 3
    assert load_config(str(path), env={}).routes[0].name == "r"


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_warnings_are_returned_not_raised() -> None:
    config, warnings = load_config_text_with_warnings("admin: {listen: '0.0.0.0:9901'}\n" + ROUTE,
                                                      "g.yaml", {})
    assert config.admin.listen.host == "0.0.0.0"
    assert [str(w) for w in warnings] == [
        "g.yaml:1:17: admin.listen: admin listens on 0.0.0.0 without a token: anyone who can "
        "reach it can reload or stop the proxy; set admin.token or listen on 127.0.0.1"
    ]


# --- positions ---------------------------------------------------------------------------------

def test_unknown_key_points_at_the_key() -> None:
    (issue,) = errors("server:\n  workers: 2\n  listn: ['127.0.0.1:80']\n")
    assert (issue.file, issue.line, issue.column, issue.key_path) == ("g.yaml", 3, 3,
                                                                      "server.listn")
    assert issue.message == "unknown key 'listn', did you mean 'listen'?"


def test_bad_value_points_at_the_value() -> None:
    (issue,) = errors("server:\n  keepalive_timeout:   5x\n")
    assert (issue.line, issue.column, issue.key_path) == (2, 24, "server.keepalive_timeout")
    assert "invalid duration '5x'" in issue.message


def test_missing_key_points_at_the_parent_mapping() -> None:
    (issue,) = errors("upstreams:\n  backend:\n    balance: random\n")
    assert (issue.line, issue.column) == (2, 3)
    assert str(issue) == "g.yaml:2:3: upstreams.backend.targets: required key is missing"


def test_list_item_paths_are_indexed() -> None:
    text = "routes:\n  - {name: a, respond: {}}\n  - name: b\n    respond: {}\n    match:\n" \
           "      path_prefx: /x\n"
    assert lines(text) == [
        "g.yaml:6:7: routes[1].match.path_prefx: unknown key 'path_prefx', "
        "did you mean 'path_prefix'?"
    ]


def test_no_close_match_lists_the_valid_keys() -> None:
    assert lines("admin: {zzz: 1}\n") == [
        "g.yaml:1:9: admin.zzz: unknown key 'zzz' (valid keys: listen, protect_reads, token)"
    ]


def test_semantic_errors_are_located_too() -> None:
    text = "upstreams:\n  backend: {targets: ['http://127.0.0.1:1']}\nroutes:\n" \
           "  - name: a\n    upstream: backnd\n"
    assert lines(text) == [
        "g.yaml:5:15: routes[0].upstream: unknown upstream 'backnd', did you mean 'backend'?"
    ]


def test_format_path_quotes_ambiguous_keys() -> None:
    assert format_path(("routes", 2, "match", "path_prefix")) == "routes[2].match.path_prefix"
    assert format_path(("upstreams", "api.v1", "pool")) == 'upstreams["api.v1"].pool'


# --- interpolation ---------------------------------------------------------------------------

def test_plain_reference_and_retyping() -> None:
    config = load_config_text("server:\n  workers: ${W}\n  listen: ['127.0.0.1:${PORT}']\n",
                              "g.yaml", {"W": "3", "PORT": "8081"})
    assert config.server.workers == 3  # a whole-scalar reference becomes an int
    assert config.server.listen[0].port == 8081


def test_default_form() -> None:
    config = load_config_text("server:\n  backlog: ${B:-128}\nadmin:\n  token: ${T:-}\n",
                              "g.yaml", {"B": ""})
    assert config.server.backlog == 128  # set but empty takes the default, as in the shell
    assert config.admin.token == ""  # an empty default is "", not YAML's null


def test_required_form() -> None:
    text = "admin:\n  token: ${TOKEN:?set TOKEN to the admin token}\n"
    assert load_config_text(text, "g.yaml", {"TOKEN": "t"}).admin.token == "t"
    assert lines(text) == [
        "g.yaml:2:10: admin.token: environment variable TOKEN is required: "
        "set TOKEN to the admin token"
    ]


def test_unset_variable_names_the_variable_and_line() -> None:
    (issue,) = errors("server:\n  workers: 2\n  backlog: ${BACKLOG}\n")
    assert issue.line == 3
    assert "BACKLOG is not set" in issue.message
    assert issue.key_path == "server.backlog"


def test_dollar_escape_and_literal_dollar() -> None:
    config = load_config_text(
        "routes:\n  - name: a\n    match: {path_regex: '^/x$'}\n"
        "    respond: {body: 'costs $$5 ${V}$$'}\n", "g.yaml", {"V": "$${NOT}"})
    assert config.routes[0].match.path_regex == "^/x$"
    # Substituted values are not expanded again.
    assert config.routes[0].respond is not None
    assert config.routes[0].respond.body == "costs $5 $${NOT}$"


def test_quoted_and_tagged_references_stay_strings() -> None:
    config = load_config_text("admin:\n  token: '${T}'\nroutes:\n  - name: !!str ${T}\n"
                              "    respond: {}\n", "g.yaml", {"T": "123"})
    assert config.admin.token == "123"
    assert config.routes[0].name == "123"


def test_partial_reference_is_a_string() -> None:
    config = load_config_text("admin:\n  token: v${N}\n", "g.yaml", {"N": "1"})
    assert config.admin.token == "v1"


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXYD_TEST_WORKERS", "5")
    assert load_config_text("server: {workers: '${PROXYD_TEST_WORKERS}'}\n",
                            "g.yaml").server.workers == 5


@pytest.mark.parametrize(("text", "message"), [
    ("${A", "unterminated"), ("${1A}", "invalid variable reference"),
    ("${A:+x}", "invalid variable reference"),
])
def test_malformed_references(text: str, message: str) -> None:
    result = interpolate(text, {"A": "x"})
    assert len(result.errors) == 1 and message in result.errors[0]


def test_interpolation_errors_hide_follow_on_errors() -> None:
    # The raw "${P}" would also fail as a port; only the root cause is reported.
    assert lines("server: {listen: ['127.0.0.1:${P}']}\n") == [
        "g.yaml:1:19: server.listen[0]: environment variable P is not set "
        "(use ${P:-default} for a default)"
    ]


# --- duplicates, YAML syntax, collecting everything -------------------------------------------

def test_duplicate_key() -> None:
    assert lines("server:\n  workers: 2\n  workers: 3\n") == [
        "g.yaml:3:3: server.workers: duplicate key 'workers' (first defined on line 2)"
    ]


def test_merge_keys_may_override() -> None:
    text = "upstreams:\n  a:\n    targets: ['http://h:1']\n    pool: &p {read_timeout: 1s}\n" \
           "  b:\n    targets: ['http://h:2']\n    pool: {<<: *p, read_timeout: 2s}\n"
    config = load_config_text(text, "g.yaml", {})
    assert config.upstreams["b"].pool.read_timeout == 2.0


def test_yaml_syntax_error_has_its_line() -> None:
    (issue,) = errors("server:\n  workers: 2\n   bad: [\n")
    assert issue.line == 3
    assert issue.message.startswith("YAML syntax error:")


def test_top_level_must_be_a_mapping() -> None:
    assert lines("- a\n") == [
        "g.yaml:1:1: the top level of a config file must be a mapping (server:, routes:, ...)"
    ]


def test_every_error_of_one_load_is_reported_in_file_order() -> None:
    text = (
        "server:\n"
        "  listn: [':80']\n"                       # 2: unknown key
        "  workers: 2\n"
        "  workers: 4\n"                           # 4: duplicate
        "  drain_timeout: ${DRAIN}\n"              # 5: unset variable
        "upstreams:\n"
        "  b: {targets: ['http://h:1'], balance: rr, pool: {max_conections: 1}}\n"  # 7: two
        "routes: [{name: a, respond: {status: 99}}]\n"  # 8: out of range
    )
    found = [(i.line, i.key_path) for i in errors(text)]
    assert found == [
        (2, "server.listn"), (4, "server.workers"), (5, "server.drain_timeout"),
        (7, "upstreams.b.balance"), (7, "upstreams.b.pool.max_conections"),
        (8, "routes[0].respond.status"),
    ]


def test_literal_suggestion() -> None:
    (issue,) = errors("upstreams:\n  b: {targets: ['http://h:1'], balance: least_con}\n")
    assert issue.message.endswith("did you mean 'least_conn'?")


def test_yes_no_keys_are_names_not_booleans() -> None:
    config = load_config_text("routes:\n  - name: r\n    respond:\n      headers: {on: 'x'}\n",
                              "g.yaml", {})
    assert config.routes[0].respond is not None
    assert config.routes[0].respond.headers == {"on": "x"}


def test_doubtful_regex_is_a_warning_not_an_exception() -> None:
    _, warnings = load_config_text_with_warnings(
        "routes:\n  - {name: a, match: {path_regex: '[[a]'}, respond: {}}\n", "g.yaml", {})
    assert [str(w) for w in warnings] == [
        "g.yaml:2:35: routes[0].match.path_regex: regular expression: Possible nested set "
        "at position 1"
    ]


def test_semantic_check_works_on_configs_built_in_code() -> None:
    from proxyd.config.models import Route
    from proxyd.config.semantic import check

    config = GatewayConfig(routes=[Route(name="a", upstream="nope")])
    report = check(config)
    assert [(f.path, f.message) for f in report.errors] == [
        (("routes", 0, "upstream"), "unknown upstream 'nope' (no upstreams are defined)")
    ]
