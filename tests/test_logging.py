"""Diffusers-style logging: one `tlora_hooks` logger, quiet by default, one INFO line per enable_tlora."""

from __future__ import annotations

import logging

import pytest

import tiny
from tlora_hooks import enable_tlora
from tlora_hooks.logging_utils import LIBRARY_LOGGER, get_verbosity, set_verbosity_info, set_verbosity_warning


def library_records(caplog, level=logging.DEBUG):
    return [r for r in caplog.records if r.name.split(".")[0] == LIBRARY_LOGGER and r.levelno >= level]


@pytest.fixture
def info_verbosity():
    set_verbosity_info()
    yield
    set_verbosity_warning()


def test_quiet_by_default(caplog, capfd):
    assert get_verbosity() == logging.WARNING
    pipe, kw = tiny.sdxl(steps=2)
    capfd.readouterr()
    enable_tlora(pipe, max_rank=8)
    pipe(**kw)
    assert library_records(caplog) == []
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
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger(LIBRARY_LOGGER).handlers)
