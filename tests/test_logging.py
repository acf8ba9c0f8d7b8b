"""Diffusers-style logging: warnings reach stderr with no logging setup, `TLORA_HOOKS_VERBOSITY` and
`set_verbosity_*` change the level, and the library's records are not printed twice."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest

import tiny
import tlora_files
from tlora_hooks import enable_tlora
from tlora_hooks.logging import LIBRARY_LOGGER, get_verbosity, set_verbosity_info, set_verbosity_warning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SILENT_FILE_WARNING = "does not record tlora_min_rank (using 1) or tlora_alpha (using 1.0)"
INFO_LINE = "Loaded "


def library_records(caplog, level=logging.DEBUG):
    return [r for r in caplog.records if r.name.split(".")[0] == LIBRARY_LOGGER and r.levelno >= level]


@pytest.fixture
def info_verbosity():
    set_verbosity_info()
    yield
    set_verbosity_warning()


@pytest.fixture(scope="module")
def file_without_schedule(tmp_path_factory):
    """A LyCORIS T-LoRA file with no SimpleTuner metadata: loading it must warn that the defaults are used."""
    pipe, _ = tiny.sdxl(rank=None)
    network = tiny.add_tlora(pipe.unet, 4)
    return tlora_files.simpletuner_file(network, tmp_path_factory.mktemp("logging") / "bare.safetensors")


def run_fresh(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`code` in a new Python process (tests/ and the repository on its path), with no logging configured."""
    script = f"import sys; sys.path[:0] = [{os.path.join(ROOT, 'tests')!r}, {ROOT!r}]\n" + textwrap.dedent(code)
    environment = {key: value for key, value in os.environ.items() if key != "TLORA_HOOKS_VERBOSITY"}
    environment.update(env or {}, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=300)


def log_both(setup: str = "") -> str:
    """A script that logs one WARNING and one INFO record through a library logger, after `setup`."""
    return f"""
        {setup}
        from tlora_hooks.logging import get_logger
        log = get_logger("tlora_hooks.example")
        log.warning("a warning")
        log.info("an info line")
    """


def test_a_warning_reaches_stderr_with_no_logging_setup(file_without_schedule):
    result = run_fresh(f"""
        import tiny
        from tlora_hooks import load_tlora
        pipe, _ = tiny.sdxl(rank=None)
        load_tlora(pipe, {file_without_schedule!r})
    """)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(SILENT_FILE_WARNING) == 1, result.stderr
    assert INFO_LINE not in result.stderr, "INFO is below the default level"


@pytest.mark.parametrize(
    "value,shown", [("error", ()), ("INFO", ("a warning", "an info line")), ("debug", ("a warning", "an info line"))]
)
def test_the_verbosity_variable_sets_the_level(value, shown):
    stderr = run_fresh(log_both(), env={"TLORA_HOOKS_VERBOSITY": value}).stderr
    assert [line for line in stderr.splitlines() if line in ("a warning", "an info line")] == list(shown), stderr


def test_an_unknown_verbosity_says_so_and_keeps_warnings():
    stderr = run_fresh(log_both(), env={"TLORA_HOOKS_VERBOSITY": "loud"}).stderr
    assert "Unknown option TLORA_HOOKS_VERBOSITY=loud" in stderr and "a warning" in stderr.splitlines()


@pytest.mark.parametrize(
    "setup,count",
    [
        ("import logging; logging.basicConfig()", 1),  # no propagation: the root handler adds no second copy
        ("from tlora_hooks import logging as tl; tl.set_verbosity_error()", 0),
        ("from tlora_hooks import logging as tl; tl.disable_default_handler()", 0),
        ("import logging; logging.basicConfig(); from tlora_hooks import logging as tl; tl.enable_propagation()", 2),
        ("import logging; logging.basicConfig(); from tlora_hooks import logging as tl; "
         "tl.disable_default_handler(); tl.enable_propagation()", 1),
    ],
)
def test_handler_and_propagation_switches(setup, count):
    stderr = run_fresh(log_both(setup)).stderr
    assert stderr.count("a warning") == count, stderr


def test_quiet_at_the_default_level(caplog, capfd):
    assert get_verbosity() == logging.WARNING
    pipe, kw = tiny.sdxl(steps=2)
    capfd.readouterr()
    enable_tlora(pipe, max_rank=8)
    pipe(**kw)
    assert library_records(caplog, logging.WARNING) == []
    assert "T-LoRA" not in capfd.readouterr().err


def test_one_info_line_names_the_denoisers_and_the_rank_range(caplog, info_verbosity):
    pipe, _ = tiny.wan("2.2_a14b", steps=2)
    caplog.clear()
    enable_tlora(pipe, max_rank=8, min_rank=2, alpha=0.5)
    (record,) = [r for r in library_records(caplog) if r.levelno == logging.INFO]
    message = record.getMessage()
    assert record.levelno == logging.INFO and record.name == "tlora_hooks.api"
    assert "transformer (" in message and "transformer_2 (" in message
    assert "ranks 2..8" in message and "alpha 0.5" in message


def test_the_library_logger_is_the_parent_of_every_module_logger():
    from tlora_hooks import api, call_rank

    assert api.logger.parent is logging.getLogger(LIBRARY_LOGGER)
    assert call_rank.logger.parent is logging.getLogger(LIBRARY_LOGGER)
