"""docs/supported-pipelines.md's matrix is generated from the convention table and the test cases, and stays so."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import diffusers
import pytest

import test_families
import test_modular
from tlora_hooks.commands import main
from tlora_hooks.support import BEGIN, END, FAMILIES, MATRIX_PAGE, matrix_section

MATRIX_FILE = Path(__file__).resolve().parents[1] / MATRIX_PAGE
CASES = {**test_families.CASES, **test_modular.CASES, **test_modular.MORE_CASES}


def held_classes(pipeline: str) -> str:
    """The class names a pipeline holds: a classic pipeline's `__init__` signature, a modular pipeline's default
    blocks' expected components."""
    cls = getattr(diffusers, pipeline)
    if getattr(cls, "default_blocks_name", None):
        blocks = getattr(diffusers, cls.default_blocks_name)()
        return " ".join(spec.type_hint.__name__ for spec in blocks.expected_components if spec.type_hint)
    return str(inspect.signature(cls.__init__))


def test_documented_matrix_is_the_generated_one():
    text = MATRIX_FILE.read_text(encoding="utf-8")
    section = text[text.index(BEGIN): text.index(END) + len(END)]
    assert section == matrix_section(), f"run `python -m tlora_hooks support --write {MATRIX_PAGE}`"


def test_every_tested_family_names_tests_that_exist():
    for family in FAMILIES:
        for test in family.tests:
            if "::" in test:
                module, name = test.split("::")
                assert name.startswith("test_") and callable(getattr(importlib.import_module(module[:-3]), name))
            else:
                assert test in CASES, f"{family.name}: no family case {test!r}"


def test_every_family_case_is_in_the_matrix():
    referenced = {test for family in FAMILIES for test in family.tests}
    assert set(CASES) <= referenced


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.pipelines != ("-",)], ids=lambda f: f.name)
def test_families_name_real_pipelines_holding_their_denoisers(family):
    held = {pipeline: held_classes(pipeline) for pipeline in family.pipelines}
    for pipeline, signature in held.items():
        assert any(denoiser in signature for denoiser in family.denoisers), f"{pipeline} holds none of them"
    for denoiser in family.denoisers:
        assert any(denoiser in signature for signature in held.values()), f"no pipeline holds {denoiser}"


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_status_agrees_with_the_table(family):
    rows = family.rows()
    if family.refusal:
        assert not rows or all(row.unsupported for row in rows)
        assert family.tests, "a refusal is tested too"
        return
    assert len(rows) == len(family.denoisers) and not any(row.unsupported for row in rows)
    assert all(row.video == ("3D" in denoiser) for row, denoiser in zip(rows, family.denoisers)), "video = a 3D model"


def test_cli_prints_and_writes_the_matrix(tmp_path, capsys):
    assert main(["support"]) == 0
    assert capsys.readouterr().out == matrix_section()[len(BEGIN) + 1: -len(END)]
    page = tmp_path / "supported-pipelines.md"
    page.write_text(f"# x\n\n{BEGIN.split(' (')[0]} -->\nstale\n{END}\n", encoding="utf-8")
    assert main(["support", "--write", str(page)]) == 0
    assert matrix_section() in page.read_text(encoding="utf-8")
    page.write_text("# no section\n", encoding="utf-8")
    assert main(["support", "--write", str(page)]) == 2
    assert "no support-matrix section" in capsys.readouterr().err
