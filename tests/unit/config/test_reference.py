"""docs/configuration.md is the generator's output for the models as they are, and every field
it lists says what it does."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from proxyd.cli import main
from proxyd.config.models import GatewayConfig, ListenSpec
from proxyd.config.reference import all_models, option_models, render

REPO = Path(__file__).resolve().parents[3]
DOC = REPO / "docs" / "configuration.md"


def test_the_committed_reference_is_current() -> None:
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/configuration.md is stale: the config models changed. Regenerate it with "
        "`proxyd config-reference > docs/configuration.md` (or `python -m "
        "proxyd.config.reference > docs/configuration.md`) and commit it.")


def test_the_cli_prints_the_reference() -> None:
    result = CliRunner().invoke(main, ["config-reference"])
    assert result.exit_code == 0, result.output
    assert result.stdout == render()


def test_every_field_has_a_description() -> None:
    missing = [f"{model.__module__}.{model.__name__}.{key}"
               for model in all_models()
               for key, field in model.model_fields.items()
               if not (field.description or "").strip()]
    assert not missing, "fields without Field(description=...): " + ", ".join(missing)


def test_the_reference_reaches_every_model() -> None:
    models = set(all_models())
    # The root, a model only a validator reaches, and every middleware type's options.
    assert {GatewayConfig, ListenSpec, *option_models().values()} <= models
    text = render()
    for model in models:
        assert f"({model.__name__})" in text


def test_each_field_is_a_row_of_its_section() -> None:
    text = render()
    for model in all_models():
        section = text.split(f'<a id="{model.__name__.lower()}"></a>', 1)[1]
        section = section.split("<a id=", 1)[0]
        for key in model.model_fields:
            assert f"| `{key}` |" in section, f"{model.__name__}.{key}"

