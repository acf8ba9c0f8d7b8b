"""A fast start: each case runs in a fresh Python process and reports which heavy packages it imported.

What is measured here is which modules got imported, never a time (`benchmarks/bench_startup.py` times them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "diffusers", "lycoris", "peft", "transformers", "accelerate")


def imported_after(code: str) -> set[str]:
    """The HEAVY packages a fresh process has imported after running `code`."""
    script = textwrap.dedent(code) + textwrap.dedent(f"""
        import json, sys
        print("IMPORTED " + json.dumps([name for name in {HEAVY!r} if name in sys.modules]))
    """)
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("IMPORTED ")]
    return set(json.loads(line.removeprefix("IMPORTED ")))


def cli(*argv: str) -> str:
    """Run `tlora-hooks argv...` in-process (its output captured), as the console script does."""
    return f"""
        import contextlib, io
        from tlora_hooks.commands import main
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                main({list(argv)!r})
            except SystemExit:
                pass
    """


def test_help_imports_nothing_heavy():
    assert imported_after(cli("--help")) == set()
    assert imported_after(cli("schedule", "--help")) == set()


@pytest.mark.parametrize(
    "argv",
    [("schedule",), ("schedule", "--scheduler", "euler", "--steps", "3"), ("support",)],
    ids=["schedule", "schedule_euler", "support"],
)
def test_schedule_and_support_import_neither_lycoris_nor_transformers_nor_peft(argv):
    assert not imported_after(cli(*argv)) & {"lycoris", "transformers", "peft", "accelerate"}


def test_importing_the_library_and_its_public_names_leaves_lycoris_for_later():
    assert imported_after("import tlora_hooks\nfrom tlora_hooks import *") <= {"torch", "safetensors"}  # __all__


def test_lycoris_arrives_with_the_first_call_that_needs_it():
    """Sanity for the test above: the same process imports LyCORIS once a T-LoRA is applied and enabled."""
    imported = imported_after("""
        import sys
        sys.path[:0] = ["tests"]
        from compat_tools import toy_with_tlora
        from tlora_hooks import enable_tlora
        enable_tlora(toy_with_tlora(), max_rank=8)
    """)
    assert "lycoris" in imported
