"""Library logging in the Diffusers style: one `tlora_hooks` logger, quiet (WARNING) by default."""

from __future__ import annotations

import logging

LIBRARY_LOGGER = "tlora_hooks"

_root = logging.getLogger(LIBRARY_LOGGER)
_root.setLevel(logging.WARNING)
_root.addHandler(logging.NullHandler())


def get_logger(name: str) -> logging.Logger:
    """A child of the library logger, as `diffusers.utils.logging.get_logger` gives."""
    return logging.getLogger(name)


def get_verbosity() -> int:
    return _root.getEffectiveLevel()


def set_verbosity(level: int) -> None:
    """`set_verbosity(logging.INFO)` shows the one line per `enable_tlora` naming the hooked denoisers."""
    _root.setLevel(level)


def set_verbosity_info() -> None:
    set_verbosity(logging.INFO)


def set_verbosity_warning() -> None:
    set_verbosity(logging.WARNING)
