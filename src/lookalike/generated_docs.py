"""The docs written from the code, so that they never drift from it: docs/configuration.md from the config's own
schema (config.py: every key with its type, default, bounds and docstring, then the defaults each base brings), and
the README's table of bases from the registry (models/families/). `make docs` rewrites both; a test fails when either
is stale.

    python -m lookalike.generated_docs docs/configuration.md README.md
"""

from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen, MultipleOf
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from lookalike.config import Section, StudyConfig
from lookalike.models.families import FAMILIES, KNOWN_BASES

INTRO = """# Configuration

A study is one TOML file (JSON and YAML with the same keys load too); `configs/quickstart.toml` is a small one and
`lookalike init` writes a commented one for any base. Relative paths are taken relative to the config file. An
unknown key or a bad value is an error that names the key: so are NaN or infinite numbers, a photo folder inside
(or containing) the workspace's `data/`, where prepare writes, and, once the base is loaded, a rank wider than its
narrowest adapted layer. `--set section.key=value` overrides any key from the
command line (values read as TOML: `--set train.learning_rate=1e-3`), and `--set section.key=` unsets one. A run
keeps its fully resolved config in `runs/<name>/config.json`, so it can be repeated from its own folder.

A key whose default is "the base's" takes the value of the base being trained or drawn: its diffusers reference
script's for training, its model card's or pipeline's for drawing (docs/bases.md says which, and where lookalike
differs on purpose). The last table lists them.

This file is written from the schema in src/lookalike/config.py by `make docs`.
"""

_BOUNDS = ((Ge, "≥", "ge"), (Gt, ">", "gt"), (Le, "≤", "le"), (Lt, "<", "lt"), (MinLen, "at least", "min_length"),
           (MaxLen, "at most", "max_length"), (MultipleOf, "a multiple of", "multiple_of"))


def _section_of(annotation) -> type[Section] | None:
    """The config section a key holds (also through `X | None`), if it holds one."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, Section):
            return candidate
    return None


def _type_name(annotation) -> str:
    """A key's type as a reader writes it in TOML."""
    if annotation is type(None):
        return "none"
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(json.dumps(value) for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin in (list, dict):
        return f"{origin.__name__} of " + ", ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path", Any: "any"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _bounds(field) -> str:
    """The key's bounds, and those of a list's items."""
    constraints = list(field.metadata)
    for arg in typing.get_args(field.annotation):  # list[Annotated[int, Field(...)]]
        for inner in typing.get_args(arg)[1:] if typing.get_origin(arg) is typing.Annotated else ():
            constraints += [("each", item) for item in getattr(inner, "metadata", [])]
    parts = []
    for constraint in constraints:
        prefix, constraint = constraint if isinstance(constraint, tuple) else ("", constraint)
        for kind, symbol, attribute in _BOUNDS:
            if isinstance(constraint, kind):
                parts.append(f"{prefix + ' ' if prefix else ''}{symbol} {getattr(constraint, attribute)}")
    return ", ".join(parts)


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return ""
    return "`" + json.dumps(value, default=str) + "`" if value is not None else "none"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        section = _section_of(field.annotation)
        if section is not None and typing.get_origin(field.annotation) is not list:
            rows.append(f"| **`{key}`** | table | | | {_cell(field.description or '')} |")
            rows += _rows(section, f"{key}.")
            continue
        rows.append(f"| `{key}` | {_type_name(field.annotation)} | {_default(field)} | {_bounds(field)} | "
                    f"{_cell(field.description or '')} |")
    return rows


def keys_without_docstrings(model: type[BaseModel] = StudyConfig, prefix: str = "") -> list[str]:
    """Every key of the schema that has no docstring."""
    missing = []
    for name, field in model.model_fields.items():
        if not field.description:
            missing.append(f"{prefix}{name}")
        section = _section_of(field.annotation)
        if section is not None and typing.get_origin(field.annotation) is not list:  # a list's entries: its own
            missing += keys_without_docstrings(section, f"{prefix}{name}.")
    return missing


def _base_defaults() -> list[str]:
    """What each base brings where the study sets nothing, from the registry."""
    from lookalike.models.base import default_guidance

    rows = ["| base | family | steps | guidance scale | text tokens | size | noise levels | VAE posterior |",
            "|---|---|---|---|---|---|---|---|"]
    for base, info in KNOWN_BASES.items():
        family = FAMILIES[info.family]
        flow = family.denoiser == "transformer"
        rows.append(f"| `{base}` | {family.name} | {info.steps} | "
                    f"{default_guidance(base) if info.guidance else 'none'} | {info.max_sequence_length} | "
                    f"{info.resolution or '[data] resolution'} | "
                    f"{family.reference_sampling.replace('_', '-') if flow else 'DDPM, uniform integer'} | "
                    f"{family.reference_posterior} |")
    return rows


def reference_markdown() -> str:
    """The whole of docs/configuration.md."""
    lines = [INTRO, "## Keys", "", "| key | type | default | bounds | what it does |", "|---|---|---|---|---|"]
    lines += _rows(StudyConfig, "")
    lines += ["", "An entry of `[[sweep.experiments]]` is a `name` plus any `[train]` key, `base` and `prior`; an "
              "entry of `[[more_subjects]]` holds the keys of `[subject]`.", "",
              "## Defaults each base brings", "",
              "The steps, guidance scale and text length `[generate]` and `[model]` take when unset; the size runs "
              "train at where the base has one of its own; how noise levels are drawn and which of the VAE "
              "posterior's latents train (the shift of the levels is the base scheduler's: docs/bases.md).", ""]
    lines += _base_defaults()
    return "\n".join(lines) + "\n"


# Where the README's table of bases lies, between these two lines.
BASES_START = "<!-- the bases: written from the registry by `make docs` -->"
BASES_END = "<!-- end of the bases -->"


def bases_table() -> str:
    """Each family and its bases: hub repository, licence (as the model card gives it), gated or not."""
    rows = ["| family | bases: hub repository (licence) | tiny model |", "|---|---|---|"]
    for family in FAMILIES.values():
        hub = [f"`{name}`: {info.repo} ({info.licence or 'see its model card'}{'; gated' if info.gated else ''})"
               for name, info in family.bases.items() if info.repo]
        tiny = [f"`{name}`" for name, info in family.bases.items() if not info.repo]
        rows.append(f"| {family.title} | {'<br>'.join(hub)} | {', '.join(tiny)} |")
    return "\n".join(rows)


def with_bases_table(readme: str) -> str:
    """The README with its table of bases written anew."""
    head, _, rest = readme.partition(BASES_START + "\n")
    _, _, tail = rest.partition(BASES_END)
    return f"{head}{BASES_START}\n{bases_table()}\n{BASES_END}{tail}"


def main() -> None:
    configuration, readme = Path(sys.argv[1]), Path(sys.argv[2])
    configuration.write_text(reference_markdown())
    readme.write_text(with_bases_table(readme.read_text()))


if __name__ == "__main__":
    main()
