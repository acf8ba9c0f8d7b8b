"""One denoiser, one thread at a time: two threads in one hooked denoiser would mix their masks."""

from __future__ import annotations

import sys
import threading
from typing import Any

from torch import nn

from .errors import TLoRAError

# Stays on the stack for a module's whole call (hooks and forward): tells a running call from an abandoned one.
_CALL_IMPL_CODE = nn.Module._call_impl.__code__


class ThreadGuard:
    """Claimed by a denoiser call's pre-hook and released by its post-hook; a second thread entering meanwhile
    raises, unless the owning call is gone (interrupted, or its thread died)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._owner_call = None

    def claim(self) -> None:
        """Make the current thread the owner; raises if another thread's call still runs."""
        me = threading.get_ident()
        call = _running_call_frame()
        with self._lock:
            if self._owner is not None and self._owner != me and self._claim_is_live():
                raise TLoRAError(
                    f"The T-LoRA {self.name} was entered from two threads at once; their masks would mix. "
                    "Use one pipeline object per thread (each with its own enable_tlora)."
                )
            self._owner, self._owner_call = me, call

    def release(self) -> bool:
        """Give up the claim; False if this thread did not hold it (its call must not clear the mask)."""
        with self._lock:
            if self._owner != threading.get_ident():
                return False
            self._owner, self._owner_call = None, None
            return True

    def running(self) -> bool:
        """Whether a claimed call is running (cheap: a hot-path test, run per block by `BlockGuard`)."""
        return self._owner is not None

    def in_call(self) -> bool:
        """Whether a claimed call is still running (not one left behind by an interrupted call)."""
        with self._lock:
            return self._owner is not None and self._claim_is_live()

    def __deepcopy__(self, memo: dict) -> ThreadGuard:
        raise TLoRAError(hooked_copy_message(self.name))

    def reset(self) -> None:
        """Forget any owner (the hook was removed)."""
        self._owner, self._owner_call = None, None

    def _claim_is_live(self) -> bool:
        """Whether the owning call still runs. One that ended without the post-hook (a KeyboardInterrupt:
        torch runs `always_call` hooks on `Exception` only) or whose thread died left a stale claim."""
        frame = sys._current_frames().get(self._owner)
        if frame is None:
            return False
        if self._owner_call is None:
            return True  # no frame to look for: assume it still runs
        while frame is not None:
            if frame is self._owner_call:
                return True
            frame = frame.f_back
        return False


def hooked_copy_message(name: str) -> str:
    """Why a denoiser cannot be deep-copied while hooked (its hooks reach this guard), and what to do instead."""
    return (
        f"copy.deepcopy of {name} while T-LoRA hooks are on it: the copy's hooks would act on the original's state "
        "(and where the fold mode runs, its weights hold the delta of the last call). Copy it before load_tlora / "
        "enable_tlora / create_tlora, or after disable_tlora (or unload_tlora), then enable or load on each copy."
    )


def _running_call_frame() -> Any:
    """The `Module._call_impl` frame of the call the claiming hook runs in (None if called some other way)."""
    frame = sys._getframe(2)  # skip this function and `claim`
    while frame is not None and frame.f_code is not _CALL_IMPL_CODE:
        frame = frame.f_back
    return frame
