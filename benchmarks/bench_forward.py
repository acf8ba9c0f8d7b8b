"""Step time of every masked-forward mode against the plain denoiser, SDXL and Flux, in one process.

    python benchmarks/bench_forward.py            # CUDA: full size, bf16; CPU: reduced size, fp32 (under a minute)
    python benchmarks/bench_forward.py --model flux --flux-blocks full --reps 3

Denoisers are built from their published configs with random weights (no downloads). The T-LoRA modules are real
LyCORIS `TLoraModule`s (`algo="tlora"`, rank 64, Attention + FeedForward, + FluxSingleTransformerBlock for Flux),
except that their SVD initialisation is replaced by random factors (timing does not depend on the values; the SVD
costs ~1 min for SDXL). Modules stay fp32 on the device, as LyCORIS builds them from a file.

Variants, interleaved (after one untimed round, each repetition runs every variant in a rotated order), medians:
  plain           LyCORIS removed (`network.restore()`): the cost of a merged LoRA, the 1.00x floor
  lycoris         enable_tlora(mode="lycoris"): LyCORIS's standard forward, as SimpleTuner runs it
  lycoris_bypass  same, with LyCORIS `bypass_mode` (modules cast to the model dtype by hand)
  low_memory, fold, auto   this library's modes
  fold_baddbmm    (CUDA) "fold" with the fused Triton kernel switched off (TLORA_HOOKS_FUSED_FOLD=0)
The mask changes on every call (timesteps spread from 999 to 0). Prints a table and one `RESULT {json}` line per
model with versions, device, date, ratios to plain, peak memory, the extra memory each handle reports, and each
mode's largest relative output difference to `mode="lycoris"` on one call.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from importlib.metadata import version
from unittest import mock

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # devtools/, shared with the tests

from devtools.lycoris_build import lycoris_without_gc  # noqa: E402
from devtools.measure import relative_error  # noqa: E402
from published_configs import SDXL_UNET  # noqa: E402

VARIANTS = ("plain", "lycoris", "lycoris_bypass", "low_memory", "fold", "auto")
CUDA_VARIANTS = VARIANTS + ("fold_baddbmm",)  # the fold without the fused Triton kernel

SDXL_REDUCED = dict(
    block_out_channels=[32, 64, 64], attention_head_dim=[2, 4, 4], cross_attention_dim=64,
    transformer_layers_per_block=[1, 1, 1], addition_time_embed_dim=8, projection_class_embeddings_input_dim=64 + 48,
    norm_num_groups=8, addition_embed_type_num_heads=2,
)
FLUX_CONFIG = dict(
    attention_head_dim=128, guidance_embeds=True, in_channels=64, joint_attention_dim=4096, num_attention_heads=24,
    num_layers=4, num_single_layers=8, patch_size=1, pooled_projection_dim=768, axes_dims_rope=[16, 56, 56],
)
FLUX_FULL_BLOCKS = dict(num_layers=19, num_single_layers=38)
FLUX_REDUCED = dict(
    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, num_layers=1, num_single_layers=2,
    pooled_projection_dim=32, axes_dims_rope=[4, 6, 6],
)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def cheap_tlora_init():
    """TLoraModule with random factors instead of an SVD of each weight (same shapes, same forward), and without
    LyCORIS's gc.collect() per module."""
    from lycoris.modules.tlora import TLoraModule

    def random_factors(self, org_module, in_dim, out_dim, flat_in_dim):
        device = org_module.weight.device
        self.q_layer.weight.data = torch.randn(self.lora_dim, in_dim, device=device) / in_dim**0.5
        self.p_layer.weight.data = torch.randn(out_dim, self.lora_dim, device=device) / self.lora_dim**0.5
        self.lambda_layer.data = torch.rand(1, self.lora_dim, device=device) + 0.5

    with mock.patch.object(TLoraModule, "_initialize_from_svd", random_factors), lycoris_without_gc():
        yield


def build_sdxl(device, dtype, reduced, resolution):
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    config = {**SDXL_UNET, **(SDXL_REDUCED if reduced else {})}
    with torch.device(device):
        model = UNet2DConditionModel(**config).to(dtype)
    latent = 8 if reduced else resolution // 8
    batch, text_tokens = 2, 77  # classifier-free guidance batches both prompts into one call
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    randn = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    inputs = dict(
        sample=randn(batch, 4, latent, latent),
        encoder_hidden_states=randn(batch, text_tokens, config["cross_attention_dim"]),
        added_cond_kwargs={"text_embeds": randn(batch, pooled), "time_ids": randn(batch, 6)},
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )

    def call(t):
        return model(timestep=t.expand(batch), **inputs).sample

    return model, call, scheduler, ["Attention", "FeedForward"], f"{latent * 8}px batch {batch}"


def build_flux(device, dtype, reduced, resolution, full_blocks=False):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    config = {**FLUX_CONFIG, **(FLUX_FULL_BLOCKS if full_blocks else {}), **(FLUX_REDUCED if reduced else {})}
    with torch.device(device):
        model = FluxTransformer2DModel(**config).to(dtype)
    tokens, text_tokens = (64, 16) if reduced else ((resolution // 16) ** 2, 512)
    randn = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    inputs = dict(
        hidden_states=randn(1, tokens, 64), encoder_hidden_states=randn(1, text_tokens, config["joint_attention_dim"]),
        pooled_projections=randn(1, config["pooled_projection_dim"]),
        guidance=torch.full((1,), 3.5, device=device, dtype=dtype),
        img_ids=torch.zeros(tokens, 3, device=device), txt_ids=torch.zeros(text_tokens, 3, device=device),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)

    def call(t):
        return model(timestep=(t / 1000).to(dtype).expand(1), return_dict=False, **inputs)[0]

    blocks = f"{config['num_layers']}+{config['num_single_layers']} blocks"
    return model, call, scheduler, ["FluxAttention", "FeedForward", "FluxSingleTransformerBlock"], (
        f"{tokens} image + {text_tokens} text tokens, {blocks}"
    )


def add_tlora(model, targets, rank, device):
    from lycoris import LycorisNetwork, create_lycoris

    LycorisNetwork.apply_preset({"target_module": targets})
    with cheap_tlora_init(), torch.device(device):
        network = create_lycoris(model, 1.0, linear_dim=rank, linear_alpha=rank // 2, algo="tlora")
    network.apply_to()
    with torch.no_grad():
        for module in network.loras:  # move away from the base state so the delta is not zero
            module.lambda_layer.mul_(1.05)
            module.p_layer.weight.add_(torch.randn_like(module.p_layer.weight) * 0.01)
    return network


@contextlib.contextmanager
def variant(name, model, network, rank, scheduler, dtype):
    """Put the model in the state `name` times; yield the handle (None for plain)."""
    from tlora_hooks import enable_tlora

    if name == "plain":
        network.restore()
        try:
            yield None
        finally:
            network.apply_to()
        return
    if name == "lycoris_bypass":
        for module in network.loras:
            module.bypass_mode = True
            module.to(dtype=dtype)  # LycorisNetwork.to() does not reach the modules; bypass needs the model dtype
    mode = "lycoris" if name.startswith("lycoris") else name.split("_baddbmm")[0]
    with mock.patch.dict(os.environ, {"TLORA_HOOKS_FUSED_FOLD": "0"} if name.endswith("_baddbmm") else {}):
        handle = enable_tlora(model, max_rank=rank, mode=mode, scheduler=scheduler)
    try:
        yield handle
    finally:
        handle.remove()
        if name == "lycoris_bypass":
            for module in network.loras:
                module.bypass_mode = False
                module.to(dtype=torch.float32)


def time_variant(name, model, network, call, timesteps, args, scheduler, device, dtype):
    """Median seconds per call of one timed loop, after warm-up calls; peak and extra memory."""
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with variant(name, model, network, args.rank, scheduler, dtype) as handle, torch.inference_mode():
        for t in timesteps[:2]:  # "auto" measures on its first call and folds before the second
            call(t)
        synchronize(device)
        start = time.perf_counter()
        for t in timesteps:
            call(t)
        synchronize(device)
        seconds = (time.perf_counter() - start) / len(timesteps)
        extra = handle.extra_memory_bytes if handle is not None else 0
        resolved = next(iter(handle.mode.values())) if handle is not None else "plain"
        fused = fused_stacks(model)
        if fused:
            resolved += f" (fused kernel: {fused[0]}/{fused[1]} stacks)"
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return seconds, peak, extra / 2**30, resolved


def fused_stacks(model):
    """(stacks folded by the fused Triton kernel, all fold stacks) of the mode enabled on `model`, or None."""
    from tlora_hooks.hooks import installed_hook
    from tlora_hooks.modes.fold import FoldStack

    hook = installed_hook(model)
    pending = [hook.mode] if hook is not None else []
    stacks = []
    while pending:
        mode = pending.pop()
        pending.extend(getattr(mode, "parts", []))
        stacks.extend(stack for stack in getattr(mode, "stacks", []) if isinstance(stack, FoldStack))
    return (sum(stack.fused is not None for stack in stacks), len(stacks)) if stacks else None


def output_differences(model, network, call, timesteps, args, scheduler, dtype):
    """Largest |out - lycoris| / max|lycoris| on one mid-schedule call, for each of this library's modes."""
    t = timesteps[len(timesteps) // 2]
    outputs = {}
    for name in ("lycoris", "low_memory", "fold", "auto"):
        with variant(name, model, network, args.rank, scheduler, dtype), torch.inference_mode():
            call(timesteps[0])
            outputs[name] = call(t)
    reference = outputs.pop("lycoris")
    return {name: relative_error(out, reference) for name, out in outputs.items()}


def run_model(kind, args, device, dtype):
    reduced = device != "cuda" and not args.full
    if kind == "sdxl":
        model, call, scheduler, targets, shape = build_sdxl(device, dtype, reduced, args.res)
    else:
        model, call, scheduler, targets, shape = build_flux(
            device, dtype, reduced, args.res, args.flux_blocks == "full"
        )
    model.eval().requires_grad_(False)
    network = add_tlora(model, targets, args.rank, device)
    scheduler.set_timesteps(args.steps, **({"mu": 1.0} if kind == "flux" else {}))
    timesteps = [t.to(device) for t in scheduler.timesteps]

    differences = output_differences(model, network, call, timesteps, args, scheduler, dtype)
    samples = {name: [] for name in args.variants}
    peaks, extras, resolved = {}, {}, {}
    for name in args.variants:  # one untimed round: first-call costs (allocator, kernel selection, Triton JIT)
        time_variant(name, model, network, call, timesteps, args, scheduler, device, dtype)
    for repetition in range(args.reps):
        order = args.variants[repetition % len(args.variants):] + args.variants[: repetition % len(args.variants)]
        for name in order:
            seconds, peak, extra, mode = time_variant(
                name, model, network, call, timesteps, args, scheduler, device, dtype
            )
            samples[name].append(seconds)
            peaks[name] = max(peaks.get(name) or 0.0, peak or 0.0) if peak is not None else None
            extras[name], resolved[name] = extra, mode

    medians = {name: statistics.median(values) for name, values in samples.items()}
    plain = medians.get("plain")
    result = dict(
        model=kind, shape=shape,
        device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        dtype=str(dtype).replace("torch.", ""), reduced=reduced, rank=args.rank, steps=args.steps, reps=args.reps,
        tlora_modules=len(network.loras), params=sum(p.numel() for p in model.parameters()),
        torch=torch.__version__, diffusers=version("diffusers"), lycoris=version("lycoris-lora"),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        variants={
            name: dict(
                s_per_step=round(medians[name], 6), vs_plain=round(medians[name] / plain, 3) if plain else None,
                samples=[round(s, 6) for s in samples[name]], peak_gib=_round(peaks[name]),
                extra_gib=round(extras[name], 3), resolved_mode=resolved[name],
                rel_diff_vs_lycoris=_significant(differences.get(name)),
            )
            for name in args.variants
        },
    )
    _print_table(result)
    print("RESULT " + json.dumps(result), flush=True)
    network.restore()
    del model, network
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def _print_table(result):
    print(f"\n{result['model']} ({result['shape']}, {result['dtype']}, rank {result['rank']}, "
          f"{result['tlora_modules']} T-LoRA modules) on {result['device']}")
    print(f"{'variant':16s} {'s/step':>9s} {'x plain':>8s} {'peak GiB':>9s} {'extra GiB':>10s} {'rel diff':>9s}  mode")
    for name, row in result["variants"].items():
        ratio = f"{row['vs_plain']:.3f}" if row["vs_plain"] else "-"
        peak = f"{row['peak_gib']:.2f}" if row["peak_gib"] is not None else "-"
        diff = f"{row['rel_diff_vs_lycoris']:.1e}" if row["rel_diff_vs_lycoris"] is not None else "-"
        print(f"{name:16s} {row['s_per_step']:9.4f} {ratio:>8s} {peak:>9s} {row['extra_gib']:10.3f} {diff:>9s}  "
              f"{row['resolved_mode']}")


def _round(value, digits=3):
    return None if value is None else round(value, digits)


def _significant(value):
    return None if value is None else float(f"{value:.3g}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["sdxl", "flux", "both"], default="both")
    parser.add_argument("--steps", type=int, default=None, help="timed calls per loop (default 8 on CUDA, 3 on CPU)")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--res", type=int, default=1024)
    parser.add_argument("--flux-blocks", choices=["anchor", "full"], default="anchor",
                        help="anchor: 4 double + 8 single blocks, as the issue's LyCORIS anchor; full: 19 + 38")
    parser.add_argument("--full", action="store_true", help="full size even on CPU (slow)")
    parser.add_argument("--variants", default=None, help=f"comma-separated subset of {CUDA_VARIANTS}")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    args.steps = args.steps or (8 if device == "cuda" else 3)
    args.reps = args.reps or 3
    requested = args.variants or ",".join(CUDA_VARIANTS if device == "cuda" else VARIANTS)
    args.variants = [v for v in requested.split(",") if v]
    unknown = set(args.variants) - set(CUDA_VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}")
    import logging

    logging.getLogger("lycoris").setLevel(logging.WARNING)
    start = time.perf_counter()
    for kind in (["sdxl", "flux"] if args.model == "both" else [args.model]):
        run_model(kind, args, device, dtype)
    print(f"total {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
