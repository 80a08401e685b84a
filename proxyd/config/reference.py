"""The configuration reference, docs/configuration.md, rendered from the models.

Each field is described once, on its model (``Field(description=...)``); this module only
arranges those descriptions into Markdown: one section per model, reached from GatewayConfig
or from a middleware type's options, with a table of key, type, default and description.
The file is generated, never edited: ``proxyd config-reference > docs/configuration.md`` (or
``python -m proxyd.config.reference``), and a unit test fails while it is stale.
"""

from __future__ import annotations

import inspect
import json
import sys
import types
from collections.abc import Iterator
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, SecretStr, WithJsonSchema
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from proxyd.config.models import GatewayConfig, ListenSpec, Server

PREAMBLE = """\
# Configuration reference

Generated from the config models by `proxyd config-reference > docs/configuration.md`; do not
edit by hand. Every key of the file is listed here with its type, its default and what it
does; `config/gateway.yaml` is an annotated example and `proxyd schema` prints the same keys
as a JSON Schema for editors.

Types: *duration* is a number of seconds or a string such as `250ms`, `5s`, `2m`, `1h`; *size*
is a number of bytes or a string such as `512B`, `8KiB`, `10MiB`, `1GiB`; *rate* is a count per
period such as `100/s`, `20/m`, `1000/h`; *host:port* is an address such as `0.0.0.0:8080` or
`[::1]:8080`. Any scalar may also be written as `${VAR}`, `${VAR:-default}` or
`${VAR:?message}`, substituted from the environment before validation.
"""


# Fields whose items a validator parses with a model of their own, outside the model tree (the
# field's declared type is the parsed value): the walk and the type column follow them here.
PARSED_WITH: dict[tuple[type[BaseModel], str], tuple[type[BaseModel], str]] = {
    (Server, "listen"): (ListenSpec, "[]"),
}


def option_models() -> dict[str, type[BaseModel]]:
    """The options model of every middleware type, by type name, as the registry knows them."""
    from proxyd.middleware import REGISTRY

    return {name: cls.options_model for name, cls in REGISTRY.items()}


def sections() -> dict[type[BaseModel], list[str]]:
    """Every model the reference documents, each once, with the key paths where it is
    written, in reading order: GatewayConfig's tree depth first, then each middleware type's
    options and their parts."""
    found: dict[type[BaseModel], list[str]] = {}
    _walk("(top level)", GatewayConfig, found)
    for name, model in sorted(option_models().items()):
        _walk(f"middleware[type={name}]", model, found)
    return found


def all_models() -> list[type[BaseModel]]:
    """Every model the reference documents."""
    return list(sections())


def _walk(path: str, model: type[BaseModel], found: dict[type[BaseModel], list[str]]) -> None:
    if model in found:
        found[model].append(path)
        return
    found[model] = [path]
    for key, field in model.model_fields.items():
        subs = list(_models_in(field.annotation))
        if (model, key) in PARSED_WITH:
            subs.append(PARSED_WITH[model, key])
        for sub, suffix in subs:
            where = key if path == "(top level)" else f"{path}.{key}"
            _walk(where + suffix, sub, found)


def _models_in(annotation: Any, suffix: str = "") -> Iterator[tuple[type[BaseModel], str]]:
    """The models an annotation holds, each with the path suffix that reaches it."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation, suffix
        return
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        yield from _models_in(args[0], suffix)
    elif origin is list:
        yield from _models_in(args[0], suffix + "[]")
    elif origin is dict:
        yield from _models_in(args[1], suffix + ".<name>")
    elif origin in (Union, types.UnionType):
        for arg in args:
            yield from _models_in(arg, suffix)


def _anchor(model: type[BaseModel]) -> str:
    return model.__name__.lower()


def _type_name(annotation: Any, metadata: list[Any] | None = None) -> str:
    for item in metadata or ():
        if isinstance(item, WithJsonSchema) and item.json_schema:
            # The config's own scalar types name themselves: "duration: 250ms, 5s, ..."
            name = str(item.json_schema.get("description", "")).partition(":")[0]
            if name:
                return "host:port" if name == "address" else name
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{_anchor(annotation)})"
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0], list(args[1:]))
    if origin is Literal:
        return " \\| ".join(json.dumps(arg) for arg in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map of {_type_name(args[0])} to {_type_name(args[1])}"
    if origin in (Union, types.UnionType):
        named = [_type_name(arg) for arg in args if arg is not type(None)]
        return " \\| ".join(named) + (" \\| null" if type(None) in args else "")
    if annotation is SecretStr:
        return "secret string"
    if isinstance(annotation, type):
        return {"str": "string", "int": "integer", "float": "number",
                "bool": "boolean"}.get(annotation.__name__, annotation.__name__)
    return str(annotation)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        # Written as the file would write it: only what the default sets; the rest is in the
        # model's own section.
        value = value.model_dump(mode="json", exclude_unset=True)
        if not value:
            return "its defaults"
    if isinstance(value, SecretStr):
        return "(secret)"
    if value is None:
        return "unset"
    if isinstance(value, str) and value:
        return f"`{value}`"
    return f"`{json.dumps(value, default=str)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render() -> str:
    """docs/configuration.md, as the models describe the config now."""
    parts = [PREAMBLE]
    for model, paths in sections().items():
        heading = ", ".join(f"`{path}`" for path in paths)
        parts.append(f'\n<a id="{_anchor(model)}"></a>\n## {heading} ({model.__name__})\n')
        doc = model.__dict__.get("__doc__")
        if doc:
            parts.append("\n" + inspect.cleandoc(doc) + "\n")
        parts.append("\n| Key | Type | Default | Description |\n|---|---|---|---|\n")
        for key, field in model.model_fields.items():
            name = field.alias or key
            kind = _type_name(field.annotation, field.metadata)
            if (model, key) in PARSED_WITH:
                parsed = PARSED_WITH[model, key][0]
                kind += f" or [{parsed.__name__}](#{_anchor(parsed)})"
            parts.append(f"| `{name}` | {kind} | {_cell(_default(field))} | "
                         f"{_cell(field.description or '')} |\n")
    return "".join(parts)


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
