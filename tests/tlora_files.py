"""T-LoRA files in every documented layout, written from tiny models: LyCORIS/SimpleTuner and official ControlGenAI.

The official layouts are written from the layers themselves (`attn.to_out[0]`, `attn.add_q_proj`, ...), so a test can
check the library's key map against the layers by identity rather than against a copy of its own strings.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file
from torch import nn

OFFICIAL_PROJECTIONS = {
    # processor layer -> how the official processor reaches the layer it adds to
    "to_q": lambda attn: attn.to_q,
    "to_k": lambda attn: attn.to_k,
    "to_v": lambda attn: attn.to_v,
    "to_out": lambda attn: attn.to_out[0] if getattr(attn, "to_out", None) is not None else None,
    "to_q_proj": lambda attn: getattr(attn, "add_q_proj", None),
    "to_k_proj": lambda attn: getattr(attn, "add_k_proj", None),
    "to_v_proj": lambda attn: getattr(attn, "add_v_proj", None),
}


def simpletuner_file(network, path, *, dtype=torch.float32, **config) -> str:
    """LyCORIS's own `save_weights`, with SimpleTuner's `lycoris_config` metadata when `config` is given."""
    metadata = {"lycoris_config": json.dumps({"algo": "tlora", **config})} if config else None
    network.save_weights(str(path), dtype, metadata)
    return str(path)


def official_layers(denoiser: nn.Module) -> dict[str, nn.Linear | None]:
    """`<attention path>.processor.<projection>_lora` -> the layer it adds to (None: the official FLUX processor
    builds it on single-stream blocks but never calls it)."""
    layers = {}
    for path, module in denoiser.named_modules():
        if not hasattr(module, "to_q") or not isinstance(module.to_q, nn.Linear):
            continue
        for projection, reach in OFFICIAL_PROJECTIONS.items():
            layer = reach(module)
            if layer is not None or "single_transformer_blocks" in path:
                layers[f"{path}.processor.{projection}_lora"] = layer
    return layers


def official_state(denoiser: nn.Module, rank: int, variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A trained-looking official state dict: Ortho (q, p, lambda + saved base) or Vanilla (down, up)."""
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    state = {}
    for prefix, layer in official_layers(denoiser).items():
        out_dim, in_dim = (layer.out_features, layer.in_features) if layer is not None else (
            denoiser.config.num_attention_heads * denoiser.config.attention_head_dim,) * 2
        if variant == "ortho":
            base_q, base_p = randn(rank, in_dim) / in_dim**0.5, randn(out_dim, rank) / rank**0.5
            base_lambda = randn(1, rank).abs()
            state.update({
                f"{prefix}.base_q.weight": base_q, f"{prefix}.base_p.weight": base_p,
                f"{prefix}.base_lambda": base_lambda,
                f"{prefix}.q_layer.weight": base_q + 0.3 * randn(rank, in_dim) / in_dim**0.5,
                f"{prefix}.p_layer.weight": base_p + 0.3 * randn(out_dim, rank) / rank**0.5,
                f"{prefix}.lambda_layer": base_lambda * (1 + 0.5 * randn(1, rank)),
            })
        else:
            state[f"{prefix}.down.weight"] = randn(rank, in_dim) / rank
            state[f"{prefix}.up.weight"] = randn(out_dim, rank) * 0.2
    return state


def official_delta(state: dict[str, torch.Tensor], prefix: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official layer's output added to the base layer's (`OrthogonalLoRALinearLayer` / `LoRALinearLayer`)."""
    if f"{prefix}.down.weight" in state:
        return (x @ state[f"{prefix}.down.weight"].T * mask) @ state[f"{prefix}.up.weight"].T
    def term(q: str, lam: str, p: str) -> torch.Tensor:
        return (x @ state[f"{prefix}.{q}"].T * state[f"{prefix}.{lam}"] * mask) @ state[f"{prefix}.{p}"].T

    tuned = term("q_layer.weight", "lambda_layer", "p_layer.weight")
    return tuned - term("base_q.weight", "base_lambda", "base_p.weight")


def save_official_sdxl(state: dict[str, torch.Tensor], path) -> str:
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    return str(path)


def save_official_flux(state: dict[str, torch.Tensor], path) -> str:
    torch.save(state, str(path))
    return str(path)
