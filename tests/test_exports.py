"""The public names: one table (`_EXPORTS`) that `__all__`, the type checkers' imports and the lazy lookup agree
with, and a docstring for each that documents every parameter under `Args:`, as diffusers' do."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest

import tlora_hooks

INIT = Path(tlora_hooks.__file__)


def type_checking_imports() -> list[tuple[str, str, str | None]]:
    """(module, name, alias) of each `from .x import ...` under `if TYPE_CHECKING:` in `tlora_hooks/__init__.py`."""
    tree = ast.parse(INIT.read_text(encoding="utf-8"))
    (block,) = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    return [(node.module, alias.name, alias.asname) for node in block.body for alias in node.names]


def test_all_and_the_type_checking_imports_list_the_exported_names():
    assert tlora_hooks.__all__ == sorted(tlora_hooks._EXPORTS)
    imports = type_checking_imports()
    assert {name: module for module, name, _ in imports} == tlora_hooks._EXPORTS
    assert [name for _, name, alias in imports if alias != name] == [], "`name as name`: a re-export"


@pytest.mark.parametrize("name", sorted(tlora_hooks._EXPORTS))
def test_each_exported_name_is_the_one_its_module_defines(name):
    module = importlib.import_module(f"tlora_hooks.{tlora_hooks._EXPORTS[name]}")
    assert getattr(tlora_hooks, name) is getattr(module, name)
    assert getattr(module, name).__module__ == module.__name__, "exported from where it is defined"


def documented_callables(name: str) -> list[tuple[str, object]]:
    """The exported object and, for a class, its public methods (a dataclass's fields are documented on the class)."""
    obj = getattr(tlora_hooks, name)
    if not inspect.isclass(obj):
        return [(name, obj)]
    fields = {field.name for field in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
    methods = [
        (f"{name}.{attribute}", value) for attribute, value in vars(obj).items()
        if inspect.isfunction(value) and not attribute.startswith("_") and attribute not in fields
    ]
    return [(name, obj), *methods]


def undocumented_parameters(obj) -> list[str]:
    try:
        parameters = inspect.signature(obj).parameters.values()
    except ValueError:
        return []
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    names = [p.name for p in parameters if p.name not in ("self", "cls") and p.kind not in variadic]
    doc = inspect.getdoc(obj) or ""
    args = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    return [n for n in names if not re.search(rf"^\s+{re.escape(n)}( \(.*?\))?:", args, re.MULTILINE)]


@pytest.mark.parametrize("name", sorted(tlora_hooks._EXPORTS))
def test_every_parameter_of_the_public_api_is_under_args(name):
    missing = {qualified: undocumented_parameters(obj) for qualified, obj in documented_callables(name)}
    assert not {qualified: params for qualified, params in missing.items() if params}
