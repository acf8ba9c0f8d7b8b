"""The library's logging, as `diffusers.utils.logging` does it: warnings reach the user by default.

The library root logger `tlora_hooks` gets one stream handler on stderr at WARNING (or `TLORA_HOOKS_VERBOSITY`) the
first time a logger is asked for, and does not propagate, so a user who configures Python's logging does not see
each line twice. `set_verbosity_*`, `disable_default_handler` and `enable_propagation` change that, as in diffusers:

    from tlora_hooks import logging
    logging.set_verbosity_info()   # also the one INFO line per enable_tlora / load_tlora
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from logging import CRITICAL, DEBUG, ERROR, INFO, WARNING

LIBRARY_LOGGER = "tlora_hooks"
VERBOSITY_VARIABLE = "TLORA_HOOKS_VERBOSITY"
LOG_LEVELS = {"debug": DEBUG, "info": INFO, "warning": WARNING, "error": ERROR, "critical": CRITICAL}
DEFAULT_LEVEL = WARNING

_lock = threading.Lock()
_default_handler: logging.Handler | None = None


def _default_level() -> int:
    """`TLORA_HOOKS_VERBOSITY` where it names a level, else WARNING (an unknown value says so)."""
    value = os.environ.get(VERBOSITY_VARIABLE)
    if not value:
        return DEFAULT_LEVEL
    if value.lower() in LOG_LEVELS:
        return LOG_LEVELS[value.lower()]
    logging.getLogger().warning(
        "Unknown option %s=%s, has to be one of: %s", VERBOSITY_VARIABLE, value, ", ".join(LOG_LEVELS)
    )
    return DEFAULT_LEVEL


def _library_root_logger() -> logging.Logger:
    return logging.getLogger(LIBRARY_LOGGER)


def _configure_library_root_logger() -> None:
    """Once per process: the stderr handler, the level, no propagation. A NullHandler stays beside it, so removing
    the stderr handler silences the library instead of handing its warnings to Python's last-resort handler."""
    global _default_handler
    with _lock:
        if _default_handler is not None:
            return
        _default_handler = logging.StreamHandler()  # sys.stderr
        if sys.stderr:
            _default_handler.flush = sys.stderr.flush
        root = _library_root_logger()
        root.addHandler(logging.NullHandler())
        root.addHandler(_default_handler)
        root.setLevel(_default_level())
        root.propagate = False


def get_logger(name: str | None = None) -> logging.Logger:
    """A logger under the library root (`get_logger(__name__)` in the library's modules).

    Args:
        name: The logger's dotted name; None gives the library root logger.
    """
    _configure_library_root_logger()
    return logging.getLogger(name or LIBRARY_LOGGER)


def get_verbosity() -> int:
    """The library root logger's level (`logging.WARNING` unless changed)."""
    _configure_library_root_logger()
    return _library_root_logger().getEffectiveLevel()


def set_verbosity(verbosity: int) -> None:
    """Set the library root logger's level.

    Args:
        verbosity: A `logging` level: `logging.INFO` also shows one line per `enable_tlora` / `load_tlora`.
    """
    _configure_library_root_logger()
    _library_root_logger().setLevel(verbosity)


def set_verbosity_debug() -> None:
    set_verbosity(DEBUG)


def set_verbosity_info() -> None:
    set_verbosity(INFO)


def set_verbosity_warning() -> None:
    set_verbosity(WARNING)


def set_verbosity_error() -> None:
    set_verbosity(ERROR)


def disable_default_handler() -> None:
    """Stop printing to stderr (your own handlers, or propagation, still receive the records)."""
    _configure_library_root_logger()
    _library_root_logger().removeHandler(_default_handler)


def enable_default_handler() -> None:
    """Print to stderr again after `disable_default_handler`."""
    _configure_library_root_logger()
    _library_root_logger().addHandler(_default_handler)


def enable_propagation() -> None:
    """Pass records on to the handlers of Python's root logger too (pytest's `caplog` listens there). Disable the
    default handler as well to avoid seeing each line twice."""
    _configure_library_root_logger()
    _library_root_logger().propagate = True


def disable_propagation() -> None:
    """Keep records to the library's own handlers (the default)."""
    _configure_library_root_logger()
    _library_root_logger().propagate = False
