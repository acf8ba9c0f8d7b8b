"""LyCORIS `algo: "tlora"` files, as SimpleTuner saves them, and the same layout written back by `convert`.

Keys are `lycoris_<module path with . -> _>.{q_layer.weight, p_layer.weight, lambda_layer, alpha}`. LyCORIS saves no
base terms: they are rebuilt from the model's weights. Files written by `convert` may add the TLoraModule buffer names
`base_q`, `base_p`, `base_lambda`, which `load_tlora` then uses instead of a rebuild.
SimpleTuner records the training config as safetensors metadata `{"lycoris_config": "<json>"}`.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import TLoRAError
from ..logging import get_logger
from .state import BaseTerms, ModuleWeights, TLoraFile, TrainingSettings

logger = get_logger(__name__)

NAME = "lycoris"
# How LyCORIS names a module (`LycorisNetwork.LORA_PREFIX` and "_"), in its files and in `network.loras`.
KEY_PREFIX = "lycoris_"
WEIGHT_KEYS = {"q": "q_layer.weight", "p": "p_layer.weight", "lam": "lambda_layer", "alpha": "alpha"}
BASE_KEYS = {"q": "base_q", "p": "base_p", "lam": "base_lambda"}
CONFIG_KEY = "lycoris_config"
WRITER_KEY = "tlora_hooks"


def lycoris_name(module_path: str) -> str:
    """The name LyCORIS gives the module wrapping a layer: `lycoris_<module path with . -> _>`."""
    return (KEY_PREFIX + module_path).replace(".", "_")


def detect(keys: list[str]) -> bool:
    return any(_split(key)[1] == WEIGHT_KEYS["lam"] for key in keys)


def read(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> TLoraFile:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    known = set(WEIGHT_KEYS.values()) | set(BASE_KEYS.values())
    for key, tensor in tensors.items():
        name, param = _split(key)
        if param in known:
            grouped.setdefault(name, {})[param] = tensor
        else:
            unknown.append(key)
    modules = {}
    for name, params in grouped.items():
        if WEIGHT_KEYS["lam"] not in params:
            unknown.extend(f"{name}.{param}" for param in params)  # another LyCORIS algo's module
            continue
        modules[name] = _module(name, params)
    return TLoraFile(
        path=path, format=NAME, modules=modules, settings=settings_from_metadata(metadata), metadata=metadata,
        unknown_keys=sorted(unknown),
    )


def _split(key: str) -> tuple[str, str]:
    name, _, param = key.partition(".")
    return name, param


def _module(name: str, params: dict[str, torch.Tensor]) -> ModuleWeights:
    missing = [WEIGHT_KEYS[k] for k in ("q", "p") if WEIGHT_KEYS[k] not in params]
    if missing:
        raise TLoRAError(f"T-LoRA module {name} has no {', '.join(missing)} in the file; the file is incomplete.")
    q, p, lam = params[WEIGHT_KEYS["q"]], params[WEIGHT_KEYS["p"]], params[WEIGHT_KEYS["lam"]]
    alpha = params.get(WEIGHT_KEYS["alpha"])
    if alpha is not None and alpha.numel() != 1:
        raise TLoRAError(
            f"{name}.{WEIGHT_KEYS['alpha']} holds {alpha.numel()} values; LyCORIS saves one (the LoRA alpha). "
            "The file is damaged or not a T-LoRA."
        )
    base = None
    if all(BASE_KEYS[k] in params for k in BASE_KEYS):
        base = BaseTerms(params[BASE_KEYS["q"]], params[BASE_KEYS["p"]], params[BASE_KEYS["lam"]])
    # LyCORIS reads a missing or zero alpha as the rank (scale 1).
    alpha_value = float(alpha) if alpha is not None and float(alpha) != 0 else float(q.shape[0])
    return ModuleWeights(q=q, p=p, lam=lam, alpha=alpha_value, base=base, source_key=name)


def settings_from_metadata(metadata: dict[str, str]) -> TrainingSettings:
    """The training settings SimpleTuner's `lycoris_config` metadata records; None for each it does not.

    A value that is recorded but unusable (unreadable JSON, a wrong type or range) is None with its problem in
    `invalid`, so `load_tlora` can refuse it unless an argument overrides it, rather than fall back to a default.
    """
    raw = metadata.get(CONFIG_KEY)
    if raw is None:
        return TrainingSettings()
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        problem = f"its `{CONFIG_KEY}` metadata is not valid JSON ({error})"
        return TrainingSettings(invalid={name: problem for name in SETTINGS.values()})
    if not isinstance(config, dict):
        problem = f"its `{CONFIG_KEY}` metadata is a JSON {type(config).__name__}, not an object"
        return TrainingSettings(invalid={name: problem for name in SETTINGS.values()})
    values, invalid = {}, {}
    for key, name in SETTINGS.items():
        if config.get(key) is None:
            continue
        value, expected = SETTING_PARSERS[name](config[key])
        if value is None:
            invalid[name] = f"its `{CONFIG_KEY}` metadata has `{key}` = {config[key]!r}, not {expected}"
        else:
            values[name] = value
    return TrainingSettings(**values, preset=config.get("apply_preset"), invalid=invalid)


def _whole_number(value: Any, minimum: int) -> tuple[int | None, str]:
    """An integer >= minimum, as JSON or a string writes it (2, 2.0, "2"); None for anything else (2.5, true)."""
    expected = f"an integer >= {minimum}"
    number = _plain_number(value)
    if number is None or not float(number).is_integer() or number < minimum:
        return None, expected
    return int(number), expected


def _finite_number(value: Any, above_zero: bool) -> tuple[float | None, str]:
    """A finite number > 0 (or >= 0), as JSON or a string writes it; None for anything else ("abc", true)."""
    expected = f"a finite number {'>' if above_zero else '>='} 0"
    number = _plain_number(value)
    if number is None or not math.isfinite(number) or number < 0 or (above_zero and number == 0):
        return None, expected
    return float(number), expected


def _plain_number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return value if isinstance(value, (int, float)) else None


# lycoris_config key -> TrainingSettings field, and how each is read.
SETTINGS = {"linear_dim": "linear_dim", "linear_alpha": "linear_alpha", "tlora_min_rank": "min_rank",
            "tlora_alpha": "alpha"}
SETTING_PARSERS = {
    "linear_dim": lambda value: _whole_number(value, 1),
    "linear_alpha": lambda value: _finite_number(value, above_zero=False),
    "min_rank": lambda value: _whole_number(value, 0),
    "alpha": lambda value: _finite_number(value, above_zero=True),
}


def write(tlora_file: TLoraFile, path: str, min_rank: int, alpha: float) -> None:
    """Save in the LyCORIS tlora layout with SimpleTuner-style metadata, so loading needs no arguments."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in tlora_file.modules.items():
        tensors[f"{name}.{WEIGHT_KEYS['q']}"] = module.q
        tensors[f"{name}.{WEIGHT_KEYS['p']}"] = module.p
        tensors[f"{name}.{WEIGHT_KEYS['lam']}"] = module.lam.reshape(1, -1)
        tensors[f"{name}.{WEIGHT_KEYS['alpha']}"] = torch.tensor(module.alpha, dtype=torch.float32)
        if module.base is not None:
            tensors[f"{name}.{BASE_KEYS['q']}"] = module.base.q
            tensors[f"{name}.{BASE_KEYS['p']}"] = module.base.p
            tensors[f"{name}.{BASE_KEYS['lam']}"] = module.base.lam.reshape(1, -1)
    config = training_config(tlora_file.metadata)
    rank = max(tlora_file.ranks)
    config.update(algo="tlora", linear_dim=rank, tlora_min_rank=min_rank, tlora_alpha=alpha)
    config.setdefault("linear_alpha", max(module.alpha for module in tlora_file.modules.values()))
    metadata = {
        CONFIG_KEY: json.dumps(config),
        WRITER_KEY: json.dumps({"source_format": tlora_file.format, "base": tlora_file.base_source}),
    }
    save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, path, metadata)


def training_config(metadata: dict[str, str]) -> dict:
    """The file's `lycoris_config` as a dict; empty where it has none or it is not a JSON object."""
    try:
        config = json.loads(metadata.get(CONFIG_KEY, "{}"))
    except json.JSONDecodeError:
        return {}
    return config if isinstance(config, dict) else {}
