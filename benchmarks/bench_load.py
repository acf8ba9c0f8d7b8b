"""Loading a T-LoRA file: LyCORIS `create_lycoris_from_weights` vs `tlora_hooks.load_tlora`, in one process.

    python benchmarks/bench_load.py            # CUDA: the full SDXL UNet (700 modules, rank 64); else a mid-size UNet
    python benchmarks/bench_load.py --size mid # force the CPU-sized model

Also times `load_tlora(..., cache_base=folder)`: the first load rebuilds and writes the base cache (cold), the later
ones read it (hit), interleaved with the uncached loads; and the cache key's two parts (the file's sha256, the
weights' checksums) alone.

The UNet is built from SDXL's published config with random weights (no downloads); the T-LoRA file is written with
random factors in LyCORIS's layout and SimpleTuner's metadata. Timings are medians of interleaved repetitions.
On CUDA, LyCORIS (SVD + gc.collect per module, ~4.7 min for SDXL on an H200) runs on a subset of modules only and is
extrapolated per module. Prints one JSON line per result; the last line starts with RESULT.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tlora_hooks and devtools/ without installing

import diffusers  # noqa: E402
from lycoris import create_lycoris_from_weights  # noqa: E402
from lycoris.modules.tlora import clear_timestep_mask, set_timestep_mask  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from devtools.lycoris_build import lycoris_without_gc  # noqa: E402
from published_configs import SDXL_UNET  # noqa: E402
from tlora_hooks import base_cache, load_tlora, rebuild, unload_tlora  # noqa: E402
from tlora_hooks.discovery import applied_tlora_modules  # noqa: E402
from tlora_hooks.schedule import masks_by_rank  # noqa: E402

SIZES = {
    "sdxl": {},
    # SDXL's layout at a fifth of its width and fewer transformer layers: 170 T-LoRA modules, 128/256 wide.
    "mid": dict(block_out_channels=[64, 128, 256], attention_head_dim=[1, 2, 4],
                transformer_layers_per_block=[1, 1, 2], norm_num_groups=32),
    # For the test suite: seconds.
    "tiny": dict(block_out_channels=[32, 64, 64], attention_head_dim=[2, 4, 4], cross_attention_dim=64,
                 transformer_layers_per_block=[1, 1, 1], addition_time_embed_dim=8, norm_num_groups=8,
                 projection_class_embeddings_input_dim=64 + 6 * 8, addition_embed_type_num_heads=2),
}
TARGETS = ("Attention", "FeedForward")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_unet(size: str, device: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**{**SDXL_UNET, **SIZES[size]}).to(dtype)
    return unet.eval().requires_grad_(False)


def target_layers(unet) -> dict[str, torch.nn.Linear]:
    """LyCORIS's names for the Linear layers inside Attention and FeedForward blocks (its `target_module` preset)."""
    layers = {}
    for name, module in unet.named_modules():
        if type(module).__name__ in TARGETS:
            for sub, layer in module.named_modules():
                if isinstance(layer, torch.nn.Linear):
                    layers[f"lycoris_{name}.{sub}".replace(".", "_")] = layer
    return layers


def write_tlora_file(layers: dict, rank: int, path: str, dtype: torch.dtype) -> None:
    """A trained-looking LyCORIS tlora file (random factors), with SimpleTuner's `lycoris_config` metadata."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, layer in layers.items():
        q = torch.randn(rank, layer.in_features, generator=generator) / layer.in_features**0.5
        p = torch.randn(layer.out_features, rank, generator=generator) / rank**0.5
        tensors[f"{name}.q_layer.weight"], tensors[f"{name}.p_layer.weight"] = q.to(dtype), p.to(dtype)
        tensors[f"{name}.lambda_layer"] = torch.rand(1, rank, generator=generator).to(dtype)
        tensors[f"{name}.alpha"] = torch.tensor(rank / 2.0).to(dtype)
    config = {"algo": "tlora", "linear_dim": rank, "linear_alpha": rank // 2, "tlora_min_rank": 1, "tlora_alpha": 1.0}
    save_file(tensors, path, {"lycoris_config": json.dumps(config)})


def time_load_tlora(unet, path: str, device: str, cache_base=False) -> float:
    sync(device)
    start = time.perf_counter()
    load_tlora(unet, path, cache_base=cache_base)
    sync(device)
    return time.perf_counter() - start


def time_lycoris(unet, path: str, device: str, weights_sd=None, collect: bool = True):
    """`create_lycoris_from_weights` + `apply_to()` + `.to(device)`, as shipped (gc.collect per module) or not."""
    sync(device)
    with contextlib.nullcontext() if collect else lycoris_without_gc():
        start = time.perf_counter()
        network, _ = create_lycoris_from_weights(1.0, path, unet, weights_sd=weights_sd)
        network.apply_to()
        network.to(device)  # after apply_to: LycorisNetwork.to() reaches only modules it has registered
        sync(device)
        elapsed = time.perf_counter() - start
    return elapsed, network


def max_delta_difference(ours, theirs, rank: int) -> float:
    """The largest difference between the two loads' masked weight deltas, at a middle rank."""
    mask = masks_by_rank(rank)[rank // 2].unsqueeze(0)
    by_name = {module.lora_name: module for module in ours}
    worst = 0.0
    with torch.no_grad():
        for reference in theirs:
            module = by_name[reference.lora_name]
            set_timestep_mask(mask, module.mask_group_id)
            set_timestep_mask(mask, reference.mask_group_id)
            mine, _ = module.get_diff_weight()
            other, _ = reference.get_diff_weight(device=mine.device)
            worst = max(worst, float((mine - other).abs().max()))
            clear_timestep_mask(module.mask_group_id)
            clear_timestep_mask(reference.mask_group_id)
    return worst


def cache_cold_load(unet, path: str, cache: str, device: str, layers: dict) -> dict:
    """The first cached load (rebuild + write), the cache file's size, and the key's two parts timed alone."""
    cold = time_load_tlora(unet, path, device, cache_base=cache)
    [name] = os.listdir(cache)
    weights = [layer.weight.detach() for layer in layers.values()]
    base_cache.weight_checksums(weights)  # warm-up
    sync(device)
    start = time.perf_counter()
    base_cache.weight_checksums(weights)
    sync(device)
    checksums = time.perf_counter() - start
    start = time.perf_counter()
    base_cache.file_sha256(path)
    file_hash = time.perf_counter() - start
    return {
        "load_tlora_cache_cold_s": round(cold, 3),
        "cache_file_mib": round(os.path.getsize(os.path.join(cache, name)) / 2**20, 1),
        "cache_key_weight_checksums_s": round(checksums, 4), "cache_key_file_sha256_s": round(file_hash, 4),
        "file_mib": round(os.path.getsize(path) / 2**20, 1),
        "weights_gib": round(sum(w.numel() * w.element_size() for w in weights) / 2**30, 3),
    }


def base_terms(unet) -> dict:
    return {module.lora_name: tuple(getattr(module, buffer).clone() for buffer in base_cache.BASE_TERM_NAMES)
            for module in applied_tlora_modules(unet)}


def decomposition_timings(layers: dict, rank: int, device: str, batch: int = 2) -> dict:
    """Seconds per matrix of each rebuild method on each distinct layer shape, and the projected full rebuild."""
    shapes: dict[tuple, list] = {}
    for layer in layers.values():
        shapes.setdefault(tuple(layer.weight.shape), []).append(layer)
    result = {}
    for method in rebuild.DECOMPOSITIONS:
        total = 0.0
        for shape, group in shapes.items():
            weights = torch.stack([layer.weight.detach() for layer in group[:batch]])
            rebuild.principal_base_terms(weights, rank, method)  # warm-up
            sync(device)
            start = time.perf_counter()
            rebuild.principal_base_terms(weights, rank, method)
            sync(device)
            per_matrix = (time.perf_counter() - start) / len(weights)
            total += per_matrix * len(group)
        result[method] = round(total, 3)
    return result


def rebuild_worker_timings(modules: list, device: str, reps: int) -> dict:
    """Seconds of the whole base rebuild, one batch at a time vs `CUDA_WORKERS` concurrent batches (on CUDA each on
    its own stream), interleaved, medians."""
    counts = (1, rebuild.CUDA_WORKERS)
    samples: dict[int, list[float]] = {workers: [] for workers in counts}
    for repetition in range(reps):
        for workers in counts if repetition % 2 == 0 else reversed(counts):
            sync(device)
            start = time.perf_counter()
            rebuild.rebuild_base_terms(modules, progress=False, workers=workers)
            sync(device)
            samples[workers].append(time.perf_counter() - start)
    return {f"workers_{workers}": round(statistics.median(values), 3) for workers, values in samples.items()}


def environment(device: str) -> dict:
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "lycoris": importlib.metadata.version("lycoris-lora"),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "threads": torch.get_num_threads(),
    }


@dataclass(frozen=True)
class Setup:
    """What this benchmark and bench_create.py share: the command line read with the device's defaults, and the
    UNet it asks for with its target layers. `subset` is how many modules LyCORIS runs on (None: all)."""

    rank: int
    reps: int
    subset: int | None
    device: str
    size: str
    dtype: torch.dtype
    unet: torch.nn.Module
    layers: dict[str, torch.nn.Linear]

    def result(self, bench: str) -> dict:
        """The head of the RESULT line: what was measured, where, on which model."""
        return {"bench": bench, **environment(self.device), "size": self.size,
                "dtype": str(self.dtype).replace("torch.", ""), "modules": len(self.layers), "rank": self.rank}


def setup(description: str, lycoris_step: str) -> Setup:
    """Parse the shared options (`lycoris_step` names what LyCORIS does per module), quiet the logs, build the UNet:
    the full SDXL UNet in bf16 on CUDA, LyCORIS on 24 modules; the mid-size one in fp32 on CPU, LyCORIS on all."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default=None, help="default: sdxl on CUDA, mid on CPU")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--reps", type=int, default=None, help="default: 3 on CPU, 2 on CUDA")
    parser.add_argument("--lycoris-modules", type=int, default=None, help=f"LyCORIS {lycoris_step} only this many "
                        "modules, extrapolated (default: all on CPU, 24 on CUDA)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = args.size or ("sdxl" if device == "cuda" else "mid")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    logging_quiet()
    unet = build_unet(size, device, dtype)
    return Setup(
        rank=args.rank, reps=args.reps or (2 if device == "cuda" else 3),
        subset=args.lycoris_modules if args.lycoris_modules is not None else (24 if device == "cuda" else None),
        device=device, size=size, dtype=dtype, unet=unet, layers=target_layers(unet),
    )


def main() -> None:
    bench = setup(__doc__, "loads")
    unet, layers, device, rank, subset, reps = (
        bench.unet, bench.layers, bench.device, bench.rank, bench.subset, bench.reps
    )
    result = {**bench.result("load_tlora"), "default_method": rebuild.DEFAULT_DECOMPOSITION}
    # First the per-method rebuild projection: the cheapest figure, and the one that picks the default.
    result["rebuild_projected_s"] = decomposition_timings(layers, rank, device)
    print(json.dumps(result), flush=True)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "tlora.safetensors")
        write_tlora_file(layers, rank, path, torch.bfloat16)
        subset_sd = None
        if subset is not None:
            from safetensors.torch import load_file

            names = list(layers)[:subset]
            subset_sd = {k: v for k, v in load_file(path).items() if k.split(".")[0] in names}
            subset_path = os.path.join(folder, "subset.safetensors")
            metadata = {"lycoris_config": json.dumps({"tlora_min_rank": 1, "tlora_alpha": 1.0})}
            save_file(subset_sd, subset_path, metadata)
        result["load_tlora_cold_s"] = round(time_load_tlora(unet, path, device), 3)
        result["rebuild_s"] = rebuild_worker_timings(applied_tlora_modules(unet), device, reps)
        print(json.dumps({"rebuild_s": result["rebuild_s"]}), flush=True)
        unload_tlora(unet)
        print(json.dumps({"load_tlora_cold_s": result["load_tlora_cold_s"]}), flush=True)
        cache = os.path.join(folder, "base_cache")
        result.update(cache_cold_load(unet, path, cache, device, layers))
        rebuilt = base_terms(unet)
        unload_tlora(unet)
        print(json.dumps({key: value for key, value in result.items() if "cache" in key}), flush=True)
        ours, theirs, theirs_no_gc, ours_subset, hits = [], [], [], [], []
        for _ in range(reps):
            ours.append(time_load_tlora(unet, path, device))
            mine = applied_tlora_modules(unet)
            elapsed, network = time_lycoris(unet, path, device, weights_sd=subset_sd)
            theirs.append(elapsed)
            result["max_abs_delta_difference"] = max_delta_difference(mine, network.loras, rank)
            network.restore()
            del network
            unload_tlora(unet)
            elapsed, network = time_lycoris(unet, path, device, weights_sd=subset_sd, collect=False)
            theirs_no_gc.append(elapsed)
            network.restore()
            del network
            gc.collect()
            if subset is not None:
                ours_subset.append(time_load_tlora(unet, subset_path, device))
                unload_tlora(unet)
            hits.append(time_load_tlora(unet, path, device, cache_base=cache))
            result["cache_hit_bit_identical"] = all(
                all(torch.equal(a, b) for a, b in zip(terms, rebuilt[name]))
                for name, terms in base_terms(unet).items()
            )
            unload_tlora(unet)
            print(json.dumps({"rep": len(ours), "load_tlora_s": ours[-1], "lycoris_s": theirs[-1],
                              "lycoris_no_gc_s": theirs_no_gc[-1], "load_tlora_cache_hit_s": hits[-1]}), flush=True)
    result["load_tlora_s"] = round(statistics.median(ours), 3)
    result["lycoris_s"] = round(statistics.median(theirs), 3)
    result["lycoris_no_gc_s"] = round(statistics.median(theirs_no_gc), 3)
    result["load_tlora_cache_hit_s"] = round(statistics.median(hits), 3)
    result["cache_hit_speedup"] = round(result["load_tlora_s"] / result["load_tlora_cache_hit_s"], 1)
    if subset is None:
        result["ratio"] = round(result["lycoris_s"] / result["load_tlora_s"], 1)
        result["ratio_no_gc"] = round(result["lycoris_no_gc_s"] / result["load_tlora_s"], 1)
    else:
        result["lycoris_modules_timed"] = subset
        result["load_tlora_same_subset_s"] = round(statistics.median(ours_subset), 3)
        per_module = result["lycoris_s"] / subset
        result["lycoris_extrapolated_s"] = round(per_module * len(layers), 1)
        result["ratio_extrapolated"] = round(result["lycoris_extrapolated_s"] / result["load_tlora_s"], 1)
        result["ratio_same_subset"] = round(result["lycoris_s"] / result["load_tlora_same_subset_s"], 1)
    if device == "cuda":
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print("RESULT", json.dumps(result), flush=True)


def logging_quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    os.environ.setdefault("TQDM_DISABLE", "1")


if __name__ == "__main__":
    main()
