"""Reading settings from files and the command line, and saying what is wrong with them.

`ConfigError` is the one error a bad setting raises: `explain` turns pydantic's validation
errors into one line per field, naming the value and, for an unknown key, the known ones.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import string
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from consistent_char.errors import UserError

__all__ = [
    "ConfigError",
    "check_prompt_template",
    "deep_merge",
    "diff",
    "explain",
    "load_mapping",
    "parse_assignment",
    "set_dotted",
]

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(UserError, ValueError):
    """A configuration value is unknown, of the wrong type, or impossible."""


def load_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads a YAML/JSON mapping with a clear error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        if p.is_dir():
            raise ConfigError(f"{p} is a folder; --config takes a YAML or JSON file")
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        why = getattr(err, "problem", None) or " ".join(str(err).split())
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{p} is not valid YAML/JSON: {why}{where}") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {p}: {err.strerror or err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of settings, got {type(data).__name__}")
    return data


def parse_assignment(text: str) -> tuple[str, Any]:
    """Parses a CLI ``key=value`` (value read as YAML: ``3``, ``0.5``, ``null``, ``[a, b]``)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads "{prompt}" as a mapping with an empty value; a template is meant.
    if isinstance(value, dict) and value and all(v is None for v in value.values()):
        value = raw
    # YAML 1.1 reads "1e-4" as a string; a learning rate is meant.
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Sets ``data["a"]["b"] = value`` for the key ``"a.b"``, making sections as needed."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`base` with `top` on it, section by section (`top` wins)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted names of the values that differ between two nested mappings."""
    if isinstance(a, dict) and isinstance(b, dict):
        names: list[str] = []
        for key in sorted(set(a) | set(b)):
            names += diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return names
    return [] if a == b else [prefix.rstrip(".")]


def _section_model(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = root
    for part in loc:
        if model is None:
            return None
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def explain(err: ValidationError, root: type[BaseModel]) -> str:
    """A pydantic error as one line per field: where, the value given, and what is wrong (an
    unknown key lists the known ones and the closest)."""
    lines = ["invalid configuration:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc) or "(config)"
        if e["type"] == "extra_forbidden":
            section = _section_model(root, loc[:-1])
            known = sorted(section.model_fields) if section else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"  {where}: unknown key{hint}; known keys: {', '.join(known)}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if loc:
            lines.append(f"  {where} = {json.dumps(e.get('input'), default=str)}: {msg}")
        else:
            lines.append(f"  {msg}")
    return "\n".join(lines)


def check_prompt_template(
    template: str,
    fields: tuple[str, ...] = ("token", "prompt"),
    what: str = "identity prompt template",
) -> str:
    """Checks a prompt template: plain text with each of `fields` (by default ``{token}`` and
    ``{prompt}``) at least once, and nothing else in braces (``{{`` and ``}}`` are literal
    braces). Attribute access, indexing, format specs and conversions are refused: the template
    is applied with `str.format`, and ``{prompt:>999999999}`` would build a gigabyte string.

    Raises:
        ValueError: The template is malformed, names another field, or lacks one of `fields`.

    Example:
        >>> check_prompt_template("a photo of {token}, {prompt}")
        'a photo of {token}, {prompt}'
        >>> check_prompt_template("{prompt} in the snow", fields=("prompt",))
        '{prompt} in the snow'
    """
    if not isinstance(template, str):
        raise ValueError(f"the {what} must be a string, got {template!r}")
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(
            f"the {what} {template!r} is malformed ({err}); write {{{{ and }}}} for literal braces"
        ) from None
    allowed = " and ".join("{" + f + "}" for f in fields)
    seen = set()
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in fields or spec or conversion:
            field = "{" + name + (f"!{conversion}" if conversion else "")
            field += (f":{spec}" if spec else "") + "}"
            raise ValueError(f"the {what} may hold only {allowed}, found {field} in {template!r}")
        seen.add(name)
    for name in fields:
        if name not in seen:
            raise ValueError(f"the {what} must contain {{{name}}}, got {template!r}")
    return template
