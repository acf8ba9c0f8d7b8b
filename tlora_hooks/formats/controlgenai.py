"""Official ControlGenAI/T-LoRA files: SD-XL `pytorch_lora_weights.safetensors` (Ortho or Vanilla) and FLUX `lora.pt`.

Both save the custom attention processors' layers: `<attention path>.processor.<projection>_lora.<param>`.
Ortho layers save their frozen base (`base_q`, `base_p`, `base_lambda`), so no rebuild is needed; Vanilla layers
are a LoRA `up(down(x) * mask)`, i.e. a T-LoRA with lambda = 1 and a zero base. No alpha is saved: the scale is 1.
"""

from __future__ import annotations

import re

import torch

from .lycoris import lycoris_name
from .state import BaseTerms, ModuleWeights, TLoraFile

KEY = re.compile(r"^(?P<path>.+)\.processor\.(?P<projection>[a-z_]+?)_lora\.(?P<param>.+)$")

# Processor layer -> the diffusers module it adds to (`Attention` in UNet2DConditionModel and FluxTransformer2DModel).
TARGETS = {
    "to_q": "to_q",
    "to_k": "to_k",
    "to_v": "to_v",
    "to_out": "to_out.0",
    "to_q_proj": "add_q_proj",
    "to_k_proj": "add_k_proj",
    "to_v_proj": "add_v_proj",
}
# The official FLUX processor builds these layers on every block but only calls them when the block has a text
# stream; single-stream blocks never use them (their attention has no `to_out` and no `add_*_proj` either).
UNUSED = [(re.compile(r"^single_transformer_blocks\.\d+\.attn$"), {"to_out", "to_q_proj", "to_k_proj", "to_v_proj"})]

ORTHO = {"q": "q_layer.weight", "p": "p_layer.weight", "lam": "lambda_layer",
         "base_q": "base_q.weight", "base_p": "base_p.weight", "base_lam": "base_lambda"}
VANILLA = {"down": "down.weight", "up": "up.weight"}
VARIANTS = {"controlgenai-ortho": ORTHO, "controlgenai-vanilla": VANILLA}


def detect(keys: list[str]) -> bool:
    return any(_parse(key) is not None for key in keys)


def read(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> TLoraFile:
    grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown, unused = [], []
    for key, tensor in tensors.items():
        parsed = _parse(key)
        if parsed is None:
            unknown.append(key)
            continue
        attention, projection, param = parsed
        if _never_used(attention, projection):
            unused.append(key)
            continue
        grouped.setdefault((attention, projection), {})[param] = tensor
    modules, variants = {}, set()
    for (attention, projection), params in grouped.items():
        variant = _variant(params)
        if variant is None:
            unknown.extend(f"{attention}.processor.{projection}_lora.{param}" for param in params)
            continue
        variants.add(variant)
        module_path = f"{attention}.{TARGETS[projection]}"
        name = lycoris_name(module_path)
        modules[name] = _module(variant, params, source_key=f"{attention}.processor.{projection}_lora")
    return TLoraFile(
        path=path, format="+".join(sorted(variants)) or "controlgenai", modules=modules, metadata=metadata,
        unused_keys=sorted(unused), unknown_keys=sorted(unknown),
    )


def _parse(key: str) -> tuple[str, str, str] | None:
    match = KEY.match(key)
    if match is None or match["projection"] not in TARGETS:
        return None
    if match["param"] not in ORTHO.values() and match["param"] not in VANILLA.values():
        return None
    return match["path"], match["projection"], match["param"]


def _never_used(attention: str, projection: str) -> bool:
    return any(pattern.match(attention) and projection in projections for pattern, projections in UNUSED)


def _variant(params: dict[str, torch.Tensor]) -> str | None:
    for variant, keys in VARIANTS.items():
        if set(keys.values()) <= set(params):
            return variant
    return None


def _module(variant: str, params: dict[str, torch.Tensor], source_key: str) -> ModuleWeights:
    if variant == "controlgenai-ortho":
        q, p = params[ORTHO["q"]], params[ORTHO["p"]]
        base = BaseTerms(params[ORTHO["base_q"]], params[ORTHO["base_p"]], params[ORTHO["base_lam"]])
        lam = params[ORTHO["lam"]]
    else:
        q, p = params[VANILLA["down"]], params[VANILLA["up"]]
        lam = torch.ones(1, q.shape[0], dtype=q.dtype)
        base = BaseTerms(torch.zeros_like(q), torch.zeros_like(p), torch.zeros_like(lam), zero=True)
    return ModuleWeights(q=q, p=p, lam=lam, alpha=float(q.shape[0]), base=base, source_key=source_key)
