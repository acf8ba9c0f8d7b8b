"""T-LoRA timestep masking for stock Hugging Face Diffusers pipelines, through torch hooks.

The public names are imported on first use (PEP 562), so `import tlora_hooks` and the `tlora-hooks` command start
fast; LyCORIS (which imports PEFT and transformers) is imported only when a call first needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
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

__all__ = [
    "RankSchedule",
    "TLoRAAdapter",
    "TLoRAError",
    "TLoRAHandle",
    "TimestepConvention",
    "create_tlora",
    "delete_tlora_adapters",
    "disable_tlora",
    "enable_tlora",
    "get_tlora_adapters",
    "load_tlora",
    "rank_for_timestep",
    "register_convention",
    "save_tlora",
    "set_tlora_adapter_weight",
    "set_tlora_adapters",
    "unload_tlora",
]

if TYPE_CHECKING:
    from .adapters import TLoRAAdapter, get_tlora_adapters, set_tlora_adapter_weight, set_tlora_adapters
    from .api import disable_tlora, enable_tlora
    from .conventions import TimestepConvention, register_convention
    from .creation import create_tlora
    from .errors import TLoRAError
    from .hooks import TLoRAHandle
    from .loading import delete_tlora_adapters, load_tlora, unload_tlora
    from .saving import save_tlora
    from .schedule import RankSchedule, rank_for_timestep


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
