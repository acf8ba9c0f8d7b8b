"""`save_tlora`: a T-LoRA made by `create_tlora` (or loaded by `load_tlora`) as a LyCORIS file with SimpleTuner's
metadata, which `load_tlora(pipe, path)` reads with no arguments and LyCORIS's `create_lycoris_from_weights` reads too.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .discovery import components_of
from .errors import TLoRAError
from .formats.locate import KNOWN_FILE_NAMES
from .formats.lycoris import CONFIG_KEY, write
from .formats.state import BaseTerms, ModuleWeights, TLoraFile
from .loading import LOAD_RECORD_ATTRIBUTE, NETWORK_RECORD_ATTRIBUTE, LoadRecord


def save_tlora(network_or_target: Any, path: str | os.PathLike) -> str:
    """Save a T-LoRA in LyCORIS's `algo="tlora"` layout, with SimpleTuner's `lycoris_config` metadata.

    The file holds, per module, LyCORIS's `q_layer.weight`, `p_layer.weight`, `lambda_layer` and `alpha`, and the
    metadata `algo`, `linear_dim`, `linear_alpha`, `tlora_min_rank`, `tlora_alpha` and `apply_preset`, so
    `load_tlora(pipe, path)` needs no arguments. Base terms that are the principal singular triplets of the layer's
    weight (the default initialisation) are rebuilt from the weights on load, as LyCORIS does; any other base terms
    (random or non-principal initialisations, base terms read from a file) are saved as `base_q`, `base_p`,
    `base_lambda`, which `load_tlora` reads and LyCORIS ignores.

    Args:
        network_or_target: The network `create_tlora` returned, or the pipeline or denoiser holding a T-LoRA that
            `create_tlora` or `load_tlora` put there.
        path: The `.safetensors` file to write, or an existing folder (the file is then
            `pytorch_lora_weights.safetensors` in it, as SimpleTuner names it).

    Returns:
        The path of the file written.
    """
    record = _record(network_or_target)
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, KNOWN_FILE_NAMES[0])
    elif not path.endswith(".safetensors"):
        raise TLoRAError(f"save_tlora writes safetensors: give a .safetensors path or a folder, not {path!r}.")
    modules = {}
    for module in record.network.loras:
        base = None
        if not module.base_from_weights:
            base = BaseTerms(*(getattr(module, name).detach().cpu() for name in ("base_q", "base_p", "base_lambda")))
        modules[module.lora_name] = ModuleWeights(
            q=module.q_layer.weight.detach().cpu(), p=module.p_layer.weight.detach().cpu(),
            lam=module.lambda_layer.detach().cpu(), alpha=module.scale * module.lora_dim, base=base,
            source_key=module.lora_name,
        )
    tlora_file = TLoraFile(
        path=path, format=record.format, modules=modules, metadata={CONFIG_KEY: json.dumps(record.config)}
    )
    write(tlora_file, path, record.enable_kwargs["min_rank"], record.enable_kwargs["alpha"])
    return path


def _record(network_or_target: Any) -> LoadRecord:
    """The record of the network `create_tlora` or `load_tlora` made, from the network or its pipeline or denoiser."""
    from lycoris import LycorisNetwork

    if isinstance(network_or_target, LycorisNetwork):
        record = network_or_target.__dict__.get(NETWORK_RECORD_ATTRIBUTE)
        if record is None:
            raise TLoRAError(
                "save_tlora saves networks made by create_tlora or load_tlora. For a network built with "
                "create_lycoris, call network.save_weights(path, None, {'lycoris_config': json.dumps(config)})."
            )
        return record
    components = components_of(network_or_target)
    records = {
        name: module.__dict__[LOAD_RECORD_ATTRIBUTE]
        for name, module in components.items()
        if LOAD_RECORD_ATTRIBUTE in module.__dict__
    }
    if len(records) != 1:
        found = ", ".join(records) or f"none of {', '.join(components)}"
        raise TLoRAError(
            f"save_tlora needs exactly one T-LoRA made by create_tlora or load_tlora on the target; it holds {found}. "
            "Pass the network create_tlora returned, or the denoiser itself."
        )
    return next(iter(records.values()))
