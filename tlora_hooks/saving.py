"""`save_tlora`: a T-LoRA made by `create_tlora` (or loaded by `load_tlora`) as a LyCORIS file with SimpleTuner's
metadata, which `load_tlora(pipe, path)` reads with no arguments and LyCORIS's `create_lycoris_from_weights` reads too.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .discovery import components_of
from .errors import TLoRAError
from .formats.locate import DEFAULT_WEIGHT_NAME
from .formats.lycoris import CONFIG_KEY, write
from .formats.state import BASE_TERM_NAMES, BaseTerms, ModuleWeights, TLoraFile
from .records import NETWORK_RECORD_ATTRIBUTE, LoadRecord, loaded_adapters


def save_tlora(network_or_target: Any, path: str | os.PathLike, *, adapter_name: str | None = None) -> str:
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
        adapter_name: Which adapter of the pipeline or denoiser to save, where it holds several (one file holds one
            adapter, as LyCORIS's and SimpleTuner's files do).

    Returns:
        The path of the file written.
    """
    record = _record(network_or_target, adapter_name)
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, DEFAULT_WEIGHT_NAME)
    elif not path.endswith(".safetensors"):
        raise TLoRAError(f"save_tlora writes safetensors: give a .safetensors path or a folder, not {path!r}.")
    modules = {}
    for module in record.network.loras:
        base = None
        if not module.base_from_weights:
            base = BaseTerms(*(getattr(module, name).detach().cpu() for name in BASE_TERM_NAMES))
        modules[module.lora_name] = ModuleWeights(
            q=module.q_layer.weight.detach().cpu(), p=module.p_layer.weight.detach().cpu(),
            lam=module.lambda_layer.detach().cpu(), alpha=module.scale * module.lora_dim, base=base,
            source_key=module.lora_name,
        )
    tlora_file = TLoraFile(
        path=path, format=record.format, modules=modules, metadata={CONFIG_KEY: json.dumps(record.config)}
    )
    write(tlora_file, path, record.schedule.min_rank, record.schedule.alpha)
    return path


def _record(network_or_target: Any, adapter_name: str | None) -> LoadRecord:
    """The record of the network `create_tlora` or `load_tlora` made, from the network or its pipeline or denoiser."""
    from lycoris import LycorisNetwork

    if isinstance(network_or_target, LycorisNetwork):
        record = network_or_target.__dict__.get(NETWORK_RECORD_ATTRIBUTE)
        if record is None:
            raise TLoRAError(
                "save_tlora saves networks made by create_tlora or load_tlora. For a network built with "
                "create_lycoris, call network.save_weights(path, None, {'lycoris_config': json.dumps(config)})."
            )
        if adapter_name is not None and adapter_name != record.adapter_name:
            raise TLoRAError(
                f"save_tlora: adapter_name={adapter_name!r}, but the network given is the adapter "
                f"{record.adapter_name!r}. Pass one or the other."
            )
        return record
    components = components_of(network_or_target)
    records = [
        (name, record)
        for name, module in components.items()
        if (loaded := loaded_adapters(module)) is not None
        for record in loaded.records.values()
        if adapter_name is None or record.adapter_name == adapter_name
    ]
    if len(records) != 1:
        found = ", ".join(f"{name}: {record.adapter_name!r}" for name, record in records)
        named = "" if adapter_name is None else f" named {adapter_name!r}"
        found = found or f"none{named} of {', '.join(components)}"
        hint = "Pass adapter_name= to say which" if adapter_name is None else "Pass the denoiser itself"
        raise TLoRAError(
            f"save_tlora needs exactly one T-LoRA made by create_tlora or load_tlora on the target; it holds {found}. "
            f"{hint}, or the network create_tlora returned."
        )
    return records[0][1]
