"""T-LoRA timestep masking for stock Hugging Face Diffusers pipelines, through torch hooks.

The public names are imported on first use (PEP 562), so `import tlora_hooks` and the `tlora-hooks` command start
fast; LyCORIS (which imports PEFT and transformers) is imported only when a call first needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it; `__all__` and the type checkers' imports below list the same names.
_EXPORTS = {
    "RankSchedule": "schedule",
    "TLoRAError": "errors",
    "TLoRAHandle": "hooks",
    "TimestepConvention": "conventions",
    "TLoRAAdapter": "adapters",
    "create_tlora": "creation",
    "delete_tlora_adapters": "loading",
    "disable_tlora": "api",
    "enable_tlora": "api",
    "get_tlora_adapters": "adapters",
    "load_tlora": "loading",
    "rank_for_timestep": "schedule",
    "register_convention": "conventions",
    "save_tlora": "saving",
    "set_tlora_adapter_weight": "adapters",
    "set_tlora_adapters": "adapters",
    "unload_tlora": "loading",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # `name as name` re-exports the name to type checkers, which cannot read a computed `__all__`
    from .adapters import TLoRAAdapter as TLoRAAdapter
    from .adapters import get_tlora_adapters as get_tlora_adapters
    from .adapters import set_tlora_adapter_weight as set_tlora_adapter_weight
    from .adapters import set_tlora_adapters as set_tlora_adapters
    from .api import disable_tlora as disable_tlora
    from .api import enable_tlora as enable_tlora
    from .conventions import TimestepConvention as TimestepConvention
    from .conventions import register_convention as register_convention
    from .creation import create_tlora as create_tlora
    from .errors import TLoRAError as TLoRAError
    from .hooks import TLoRAHandle as TLoRAHandle
    from .loading import delete_tlora_adapters as delete_tlora_adapters
    from .loading import load_tlora as load_tlora
    from .loading import unload_tlora as unload_tlora
    from .saving import save_tlora as save_tlora
    from .schedule import RankSchedule as RankSchedule
    from .schedule import rank_for_timestep as rank_for_timestep


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
