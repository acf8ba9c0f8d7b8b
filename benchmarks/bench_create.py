"""Creating a T-LoRA: LyCORIS `create_lycoris(..., algo="tlora")` vs `tlora_hooks.create_tlora`, in one process.

    python benchmarks/bench_create.py            # CUDA: the full SDXL UNet (700 modules, rank 64); else mid-size
    python benchmarks/bench_create.py --size mid # force the CPU-sized model

Both build the same modules (SimpleTuner's preset: every Linear inside `Attention` and `FeedForward`) on a UNet built
from SDXL's published config with random weights (no downloads), initialised from the principal SVD of each weight:
LyCORIS as shipped (one fp32 SVD and one `gc.collect()` per module, `apply_to()`, `.to(device)`), LyCORIS with its
`gc.collect` patched out, and `create_tlora` (one batched decomposition, registered, hooks enabled). Timings are
medians of interleaved repetitions. On CUDA, LyCORIS runs on a subset of modules (a `target_name` preset) and is
extrapolated per module; `create_tlora` is timed on the same subset too. Also reported: how far the two initial
adapters are apart (each module's P diag(lambda) Q, which does not depend on the signs the SVDs pick).
Prints one JSON line per result; the last line starts with RESULT.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tlora_hooks and devtools/ without installing

from bench_load import TARGETS, setup, sync  # noqa: E402
from lycoris import LycorisNetwork, create_lycoris  # noqa: E402

from devtools.lycoris_build import lycoris_without_gc  # noqa: E402
from tlora_hooks import create_tlora, unload_tlora  # noqa: E402
from tlora_hooks.presets import lycoris_defaults  # noqa: E402


def preset_for(names: list[str] | None) -> dict:
    """SimpleTuner's preset, or exactly the layers `names` (module paths) for a timed subset."""
    return {"target_module": list(TARGETS)} if names is None else {"target_module": [], "target_name": names}


def time_lycoris(unet, rank: int, preset: dict, device: str, collect: bool) -> tuple[float, LycorisNetwork]:
    """`apply_preset` + `create_lycoris` + `apply_to()` + `.to(device)`, as SimpleTuner does."""
    sync(device)
    with contextlib.nullcontext() if collect else lycoris_without_gc():
        start = time.perf_counter()
        LycorisNetwork.apply_preset(preset)
        network = create_lycoris(unet, 1.0, rank, rank // 2, algo="tlora", warn_on_unmatched=False)
        network.apply_to()
        network.to(device)
        sync(device)
        elapsed = time.perf_counter() - start
    for name, value in lycoris_defaults().items():
        setattr(LycorisNetwork, name, value)
    return elapsed, network


def time_create_tlora(unet, rank: int, preset: dict, device: str) -> tuple[float, LycorisNetwork]:
    config = {"algo": "tlora", "linear_dim": rank, "linear_alpha": rank // 2, "apply_preset": preset}
    sync(device)
    start = time.perf_counter()
    network = create_tlora(unet, config)
    sync(device)
    return time.perf_counter() - start, network


def product_difference(ours: LycorisNetwork, theirs: LycorisNetwork) -> dict:
    """Largest relative difference of each module's P diag(lambda) Q, and of its singular values, between the two."""
    by_name = {module.lora_name: module for module in theirs.loras}
    worst_product = worst_lambda = 0.0
    with torch.no_grad():
        for module in ours.loras:
            other = by_name[module.lora_name]
            products = []
            for candidate in (module, other):
                q = candidate.q_layer.weight.reshape(candidate.lora_dim, -1).float()
                p = candidate.p_layer.weight.reshape(-1, candidate.lora_dim).float()
                products.append((p * candidate.lambda_layer.float()) @ q)
            mine, reference = (t.to(products[1].device) for t in products)
            worst_product = max(worst_product, float((mine - reference).abs().max() / reference.abs().max()))
            lam, lam_ref = module.lambda_layer.float().cpu(), other.lambda_layer.float().cpu()
            worst_lambda = max(worst_lambda, float((lam - lam_ref).abs().max() / lam_ref.abs().max()))
    return {"max_rel_product_difference": worst_product, "max_rel_lambda_difference": worst_lambda}


def main() -> None:
    bench = setup(__doc__, "builds")
    unet, layers, device, rank, subset, reps = (
        bench.unet, bench.layers, bench.device, bench.rank, bench.subset, bench.reps
    )
    paths = {module: name for name, module in unet.named_modules()}
    names = None if subset is None else [paths[layer] for layer in list(layers.values())[:subset]]
    timed = len(layers) if subset is None else subset
    result = {**bench.result("create_tlora"), "lycoris_modules_timed": timed}
    samples: dict[str, list[float]] = {key: [] for key in ("create_tlora", "create_tlora_subset", "lycoris",
                                                          "lycoris_no_gc")}
    for repetition in range(reps):
        elapsed, network = time_create_tlora(unet, rank, preset_for(None), device)
        samples["create_tlora"].append(elapsed)
        assert len(network.loras) == len(layers)
        unload_tlora(unet)
        if subset is not None:
            samples["create_tlora_subset"].append(time_create_tlora(unet, rank, preset_for(names), device)[0])
            unload_tlora(unet)
        for key, collect in (("lycoris", True), ("lycoris_no_gc", False)):
            elapsed, theirs = time_lycoris(unet, rank, preset_for(names), device, collect)
            samples[key].append(elapsed)
            assert len(theirs.loras) == timed
            theirs.restore()
            if repetition == 0 and collect:
                _, ours = time_create_tlora(unet, rank, preset_for(names), device)
                result.update(product_difference(ours, theirs))
                unload_tlora(unet)
            del theirs
            gc.collect()
        print(json.dumps({"rep": repetition, **{key: values[-1] for key, values in samples.items() if values}}),
              flush=True)
    medians = {key: round(statistics.median(values), 3) for key, values in samples.items() if values}
    result.update({f"{key}_s": value for key, value in medians.items()})
    per_module = medians["lycoris"] / timed
    result["lycoris_extrapolated_s"] = round(per_module * len(layers), 1)
    result["ratio"] = round(result["lycoris_extrapolated_s"] / medians["create_tlora"], 1)
    result["ratio_no_gc"] = round(medians["lycoris_no_gc"] / timed * len(layers) / medians["create_tlora"], 1)
    if subset is not None:
        result["ratio_same_subset"] = round(medians["lycoris"] / medians["create_tlora_subset"], 1)
    if device == "cuda":
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print("RESULT", json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
