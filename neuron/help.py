"""`--help` text generated from the config dataclasses: every field, its default, and its comment."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import typing
from typing import Any

from neuron import config as cfg


@functools.lru_cache(maxsize=None)
def field_comments(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field of a dataclass, read from its source."""
    lines = inspect.getsource(cls)
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(lines).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out: dict[str, str] = {}
    tree = ast.parse(textwrap.dedent(lines))
    for node in tree.body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            # A field written over several lines carries its comment on the last one.
            for line in range(node.end_lineno, node.lineno - 1, -1):
                if line in comments:
                    out[node.target.id] = comments[line]
                    break
    return out


def _type_name(typ: Any) -> str:
    if typing.get_origin(typ) is tuple:
        return "A,B,..."
    return {bool: "[BOOL]", int: "INT", float: "FLOAT", str: "TEXT"}.get(typ, str(typ))


def _default(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(value) or '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return '""'
    return str(value)


def _rows(cls: type, values: Any, prefix: str = "") -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(section heading, [(flag, default, comment)]) for `cls`, top-level fields first."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    top: list[tuple[str, str, str]] = []
    sections = []
    for f in dataclasses.fields(cls):
        value = getattr(values, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            doc = (hints[f.name].__doc__ or "").strip()
            (_, own), *nested = _rows(hints[f.name], value, prefix + f.name + ".") or [("", [])]
            sections += [(f"{prefix}{f.name}: {doc}", own), *nested]
        else:
            flag = f"--{prefix}{f.name} {_type_name(hints[f.name])}"
            top.append((flag, _default(value), comments.get(f.name, "")))
    return [("options", top), *sections]


def render(command: str, cls: type, yaml_name: str | None = None, usage: str = "",
           positional: str = "") -> str:
    """The help of one command: usage, description, each option with default and comment, aliases."""
    yaml_path = cfg.default_yaml(yaml_name) if yaml_name else None
    values = cfg.load(cls, yaml_path)
    doc = " ".join((cls.__doc__ or "").split())
    out = [f"usage: neuron {command} {usage or (positional + ' ' if positional else '') + '[options]'}", "", doc, ""]
    if yaml_path is not None:
        out += [f"Defaults: the dataclass, then {yaml_path} (shipped in the package), then --config PATH "
                "(--config=PATH: only the keys it names), then flags (--section.name VALUE or --section.name=VALUE).", ""]
    else:
        out += ["Flags: --section.name VALUE or --section.name=VALUE; booleans alone mean true.", ""]
    out[-1:-1] = ["Dashes and underscores in a flag are the same (--max-new-tokens = --max_new_tokens)."]
    width = 34
    for heading, rows in _rows(cls, values):
        if not rows:
            continue
        out.append(heading)
        for flag, default, comment in rows:
            text = f"{comment} (default: {default})" if comment else f"(default: {default})"
            wrapped = textwrap.wrap(text, 110 - width) or [""]
            first = f"  {flag:<{width - 2}}" if len(flag) < width - 2 else f"  {flag}\n{'':<{width}}"
            out.append(first + wrapped[0])
            out += [" " * width + line for line in wrapped[1:]]
        out.append("")
    aliases = cfg.aliases_for(cls)
    if aliases:
        out.append("aliases (btcli and subnet-template names): "
                   + ", ".join(f"--{a} = --{c}" for a, c in sorted(aliases.items())))
        out.append("")
    out.append(f"  {'--config PATH':<{width - 2}}a YAML file laid over these defaults: it sets only the keys it names")
    out.append(f"{'':<{width}}(an error if missing)")
    out.append(f"  {'-h, --help':<{width - 2}}show this help")
    return "\n".join(out).rstrip() + "\n"
