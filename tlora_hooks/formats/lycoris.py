"""LyCORIS `algo: "tlora"` files, as SimpleTuner saves them, and the same layout written back by `convert`.

Keys are `lycoris_<module path with . -> _>.{q_layer.weight, p_layer.weight, lambda_layer, alpha}`. LyCORIS saves no
base terms: they are rebuilt from the model's weights. Files written by `convert` may add the TLoraModule buffer names
`base_q`, `base_p`, `base_lambda`, which `load_tlora` then uses instead of a rebuild.
SimpleTuner records the training config as safetensors metadata `{"lycoris_config": "<json>"}`.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import TLoRAError
from ..logging_utils import get_logger
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
    base = None
    if all(BASE_KEYS[k] in params for k in BASE_KEYS):
        base = BaseTerms(params[BASE_KEYS["q"]], params[BASE_KEYS["p"]], params[BASE_KEYS["lam"]])
    # LyCORIS reads a missing or zero alpha as the rank (scale 1).
    alpha_value = float(alpha) if alpha is not None and float(alpha) != 0 else float(q.shape[0])
    return ModuleWeights(q=q, p=p, lam=lam, alpha=alpha_value, base=base, source_key=name)


def settings_from_metadata(metadata: dict[str, str]) -> TrainingSettings:
    """The training settings SimpleTuner's `lycoris_config` metadata records; None for each it does not."""
    raw = metadata.get(CONFIG_KEY)
    if raw is None:
        return TrainingSettings()
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        logger.warning("Ignoring the file's `%s` metadata: it is not JSON (%s).", CONFIG_KEY, error)
        return TrainingSettings()
    if not isinstance(config, dict):
        logger.warning("Ignoring the file's `%s` metadata: it is not a JSON object.", CONFIG_KEY)
        return TrainingSettings()
    return TrainingSettings(
        linear_dim=_number(config, "linear_dim", int),
        linear_alpha=_number(config, "linear_alpha", float),
        min_rank=_number(config, "tlora_min_rank", int),
        alpha=_number(config, "tlora_alpha", float),
        preset=config.get("apply_preset"),
    )


def _number(config: dict, key: str, kind: type) -> Any:
    value = config.get(key)
    if value is None:
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        logger.warning("Ignoring `%s` = %r in the file's metadata: not a number.", key, value)
        return None
    if kind is int and number != float(value):
        logger.warning("Ignoring `%s` = %r in the file's metadata: not an integer.", key, value)
        return None
    return number


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
