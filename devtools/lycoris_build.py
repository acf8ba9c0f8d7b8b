"""Building LyCORIS T-LoRA networks as fast as tests and benchmarks need."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock


@contextmanager
def lycoris_without_gc() -> Iterator[None]:
    """LyCORIS runs gc.collect() once per T-LoRA module it builds (0.3 s each in a test process); skip it."""
    with mock.patch("lycoris.modules.tlora.gc.collect", lambda *args: 0):
        yield
