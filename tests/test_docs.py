"""The README and docs/ stay true to the code: their Python examples compile and import what exists, links resolve."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT_BYTES = 12_000  # a new user reads it in one sitting; reference lives in docs/

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.+)$", re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")


# Engines docs/scale-out.md shows recipes for but the tests do not install (xFuser needs a GPU to import; Ray costs
# 240 MB and a local cluster): their imports are checked only where they are installed.
ENGINES_NOT_INSTALLED = {name for name in ("xfuser", "ray") if importlib.util.find_spec(name) is None}


def python_blocks(page: Path) -> list[str]:
    return [body for language, body in FENCE.findall(page.read_text(encoding="utf-8")) if language == "python"]


def prose(page: Path) -> str:
    """The page without its fenced blocks, so a `#` comment or a bracket in code is neither a heading nor a link."""
    return FENCE.sub("", page.read_text(encoding="utf-8"))


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    found: set[str] = set()
    for heading in HEADING.findall(prose(page)):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        candidate, repeat = slug, 0
        while candidate in found:
            repeat += 1
            candidate = f"{slug}-{repeat}"
        found.add(candidate)
    return found


def imported_names(tree: ast.AST) -> list[tuple[str, str | None]]:
    """(module, name) for every `from module import name`, (module, None) for every `import module`."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            names += [(alias.name, None) for alias in node.names]
    return names


BLOCKS = [(page, index, block) for page in PAGES for index, block in enumerate(python_blocks(page))]


def test_the_pages_hold_python_examples():
    assert python_blocks(README), "the README's quick start is Python"
    assert {page.name for page, _, _ in BLOCKS} >= {"README.md", "loading.md", "rank-selection.md"}


@pytest.mark.parametrize(
    ("page", "index", "block"), BLOCKS, ids=[f"{page.name}-{index}" for page, index, _ in BLOCKS]
)
def test_python_block_compiles_and_imports_what_exists(page, index, block):
    compile(block, f"{page.name} python block {index}", "exec")
    for module_name, name in imported_names(ast.parse(block)):
        if module_name.partition(".")[0] in ENGINES_NOT_INSTALLED:
            continue
        module = importlib.import_module(module_name)
        if name is not None:
            assert hasattr(module, name), f"{page.name} block {index}: {module_name} has no {name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_calls_into_tlora_hooks_pass_only_keywords_it_takes(page):
    """`load_tlora(pipe, path, cache_base=True)` in a page fails here once `cache_base` is renamed."""
    tlora_hooks = importlib.import_module("tlora_hooks")
    trees = [ast.parse(block) for block in python_blocks(page)]
    public = {
        name: getattr(tlora_hooks, name)
        for tree in trees
        for module_name, name in imported_names(tree)
        if module_name == "tlora_hooks" and name is not None and callable(getattr(tlora_hooks, name, None))
    }
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in public:
                parameters = inspect.signature(public[node.func.id]).parameters
                passed = {keyword.arg for keyword in node.keywords if keyword.arg is not None}
                assert passed <= set(parameters), f"{page.name}: {node.func.id} takes no {passed - set(parameters)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_resolve(page):
    for target in LINK.findall(INLINE_CODE.sub("", prose(page))):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.is_file(), f"{page.name}: {target} points at no file"
        assert linked.is_relative_to(ROOT), f"{page.name}: {target} leaves the repository"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.name}: {target}: {linked.name} has no heading #{anchor}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in LINK.findall(prose(README))}
    assert set(PAGES[1:]) <= linked, f"not in the README: {sorted(p.name for p in set(PAGES[1:]) - linked)}"


def test_readme_stays_short():
    size = len(README.read_bytes())
    assert size <= README_LIMIT_BYTES, f"README.md is {size} bytes; move reference into docs/"
