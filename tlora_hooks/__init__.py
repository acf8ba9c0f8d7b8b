"""T-LoRA timestep masking for stock Hugging Face Diffusers pipelines, through torch hooks."""

from .api import disable_tlora, enable_tlora
from .conventions import TimestepConvention, register_convention
from .creation import create_tlora
from .errors import TLoRAError
from .hooks import TLoRAHandle
from .loading import load_tlora, unload_tlora
from .saving import save_tlora
from .schedule import RankSchedule, rank_for_timestep

__version__ = "0.1.0"

__all__ = [
    "RankSchedule",
    "TLoRAError",
    "TLoRAHandle",
    "TimestepConvention",
    "create_tlora",
    "disable_tlora",
    "enable_tlora",
    "load_tlora",
    "rank_for_timestep",
    "register_convention",
    "save_tlora",
    "unload_tlora",
]
