"""What each mode adds to a denoiser call, counted (not timed) on the meta device: FLOPs, kernels, bytes.

    python benchmarks/cost_model.py          # SDXL 1024² batch 2 and Flux 4+8 blocks 1024², bf16, rank 64

Runs the published-config denoisers on meta tensors (no memory, no weights) under torch's FLOP counter and counts the
kernel-launching operators of one plain call; the T-LoRA layers and their token counts come from the same LyCORIS
network the benchmarks use. Floors, not timings: `low_memory`'s bypass adds 2·tokens·2r·(in + out) FLOPs and two
kernels per layer; the fold reads W0 and writes W once per call (2 × the targeted weights' bytes) plus the thin
matmul's FLOPs.
Also the extra memory each mode holds (what `handle.extra_memory_bytes` reports), from the layer shapes.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # devtools/, shared with the tests

from bench_forward import add_tlora, build_flux, build_sdxl  # noqa: E402
from devtools.measure import KernelCounter  # noqa: E402


def cost(kind: str, rank: int = 64) -> dict:
    dtype = torch.bfloat16
    build = build_sdxl if kind == "sdxl" else build_flux
    model, call, scheduler, targets, shape = build("meta", dtype, False, 1024)
    network = add_tlora(model, targets, rank, "meta")
    layers: list[nn.Linear] = [module.org_module[0] for module in network.loras]
    network.restore()
    tokens: dict[nn.Module, int] = {}
    handles = [
        layer.register_forward_hook(lambda m, a, o: tokens.__setitem__(m, a[0].numel() // m.in_features))
        for layer in layers
    ]
    with torch.no_grad(), FlopCounterMode(display=False) as flops, KernelCounter() as kernels:
        call(torch.tensor(500.0, device="meta"))
    for handle in handles:
        handle.remove()
    total = flops.get_total_flops()
    weight_bytes = sum(layer.weight.numel() * layer.weight.element_size() for layer in layers)
    bypass = sum(2 * tokens[layer] * 2 * rank * (layer.in_features + layer.out_features) for layer in layers)
    targeted = sum(2 * tokens[layer] * layer.in_features * layer.out_features for layer in layers)
    fold = sum(2 * 2 * rank * layer.in_features * layer.out_features for layer in layers)
    size = torch.empty((), dtype=dtype).element_size()
    factors = sum(2 * rank * (layer.in_features + layer.out_features) * size for layer in layers)
    masked_copies = sum(2 * rank * min(layer.in_features, layer.out_features) * size for layer in layers)
    return dict(
        model=kind, shape=shape, tlora_layers=len(layers), plain_gflop=round(total / 1e9),
        targeted_linear_share=round(targeted / total, 3),
        plain_kernels=kernels.count,
        bypass_extra_flop_share=round(bypass / total, 4), bypass_extra_kernels=2 * len(layers),
        fold_gib_moved_per_call=round(2 * weight_bytes / 2**30, 2), fold_extra_flop_share=round(fold / total, 4),
        fold_extra_gib=round((weight_bytes + factors) / 2**30, 2),
        low_memory_extra_gib=round((factors + masked_copies) / 2**30, 2),
    )


if __name__ == "__main__":
    for kind in ("sdxl", "flux"):
        print("RESULT " + json.dumps(cost(kind)))
