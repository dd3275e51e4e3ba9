"""The resolved config as YAML with each field's ``#:`` comment above it (``tolaria config``).

The comments live where the fields are defined, as ``#:`` lines above each field of a
``Section`` in ``tolaria/config.py`` (Sphinx's attribute-comment convention), so a field
and its explanation are written and reviewed together.  They are read back from that
source with ``ast``: nothing is duplicated into ``Field(description=...)``.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from functools import cache

import yaml
from pydantic import BaseModel

from tolaria.config import TolariaConfig

COMMENT_MARK = "#:"


@cache
def field_comments(section: type[BaseModel]) -> dict[str, str]:
    """``{field: comment}`` for the fields of ``section`` that have ``#:`` lines above them
    (multi-line comments keep their line breaks)."""
    try:
        source = textwrap.dedent(inspect.getsource(section))
    except OSError:  # installed without its sources (bytecode only): plain YAML then
        return {}
    lines = source.splitlines()
    (definition,) = ast.parse(source).body
    comments = {}
    for node in definition.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above = []
        row = node.lineno - 2  # the line above the field (lineno counts from 1)
        while row >= 0 and lines[row].strip().startswith(COMMENT_MARK):
            above.append(lines[row].strip().removeprefix(COMMENT_MARK).strip())
            row -= 1
        if above:
            comments[node.target.id] = "\n".join(reversed(above))
    return comments


def commented_yaml(config: TolariaConfig) -> str:
    """``config.to_yaml()`` with each section's and each field's comment above it; loading
    it gives back the same config."""
    values = config.model_dump(mode="json")
    out: list[str] = []
    for section, section_field in type(config).model_fields.items():
        out += _comment(field_comments(type(config)).get(section), indent="")
        out.append(f"{section}:")
        comments = field_comments(section_field.annotation)
        for name, value in values[section].items():
            out += _comment(comments.get(name), indent="  ")
            dumped = yaml.safe_dump({name: value}, sort_keys=False).rstrip("\n")
            out += ["  " + line for line in dumped.splitlines()]
    return "\n".join(out) + "\n"


def _comment(text: str | None, indent: str) -> list[str]:
    if not text:
        return []
    text = text.replace("``", "`")  # the source's reST literals, as a reader types them
    return [f"{indent}# {line}".rstrip() for line in text.splitlines()]
