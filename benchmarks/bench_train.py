"""One T-LoRA training step (forward + backward) at batch 4, three ways, side by side in one process.

    python benchmarks/bench_train.py               # CUDA: SDXL's UNet at 1024 px, bf16 autocast; CPU: a mid-size UNet
    python benchmarks/bench_train.py --size tiny   # seconds, for the test suite

An SDXL-layout UNet with random weights (no downloads), T-LoRA (LyCORIS `algo="tlora"`, rank 64) on the Linear layers
of `Attention` and `FeedForward`, base frozen, four samples with timesteps of four different ranks. Variants:
  tlora_hooks     one call of the whole batch with `enable_tlora` (mode "auto"): the per-sample training forward
  lycoris_loop    LyCORIS's own forward one sample at a time, each with its (1, R) mask and its own backward: the
                  only correct way to train T-LoRA at batch > 1 without this library (target: tlora_hooks <= 0.5x)
  peft_lora       a PEFT LoRA of the same rank on the same layers of a copy of the same UNet, one call of the batch:
                  the floor a plain LoRA sets (target: tlora_hooks <= 1.3x)
Interleaved repetitions after one untimed round (each repetition runs every variant in a rotated order), medians.
On the CPU the ratios are of process CPU time (`time.process_time()`), which other jobs on a shared machine disturb
far less than wall time (both are reported); on CUDA of wall time, synchronised.
Memory: on CUDA the peak allocated during the step; on the CPU, where torch keeps no allocator statistics (and RSS
or tracemalloc do not see its allocations), the bytes autograd saves for backward (unique storages, through
`torch.autograd.graph.saved_tensors_hooks`), the part of a training step's memory that grows with the batch. The
lycoris_loop's figure is one sample's, since it runs backward after each. Also checks that tlora_hooks' gradients
equal the LyCORIS loop's. Prints a table and one `RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from importlib.metadata import version

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # devtools/, shared with the tests

from bench_forward import add_tlora, synchronize  # noqa: E402
from devtools.measure import relative_error  # noqa: E402
from published_configs import SDXL_UNET  # noqa: E402

VARIANTS = ("tlora_hooks", "lycoris_loop", "peft_lora")
TIMESTEPS = (999, 700, 400, 50)  # four different ranks
# (config overrides, latent side): the CPU size is where the step's matmuls, not Python, take the time
SIZES = {
    "tiny": (dict(block_out_channels=[32, 64, 64], attention_head_dim=[2, 4, 4], cross_attention_dim=64,
                  transformer_layers_per_block=[1, 1, 1], addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=64 + 48, norm_num_groups=8, addition_embed_type_num_heads=2,
                  layers_per_block=1), 8),
    "cpu": (dict(block_out_channels=[128, 256, 512], attention_head_dim=[2, 4, 8], cross_attention_dim=512,
                 transformer_layers_per_block=[1, 1, 2], addition_time_embed_dim=64,
                 projection_class_embeddings_input_dim=512 + 6 * 64, norm_num_groups=32,
                 addition_embed_type_num_heads=8, layers_per_block=1), 32),
    "full": ({}, 128),
}


def build(size: str, batch: int, device: str):
    """The UNet (frozen, fp32 on the CPU, bf16 on CUDA), its inputs, and the step's loss for rows of the batch."""
    from diffusers import UNet2DConditionModel

    overrides, latent = SIZES[size]
    config = {**SDXL_UNET, **overrides}
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**config).to(dtype).requires_grad_(False)
    generator = torch.Generator(device).manual_seed(1)
    randn = lambda *shape: torch.randn(*shape, generator=generator, device=device).to(dtype)  # noqa: E731
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    inputs = dict(sample=randn(batch, 4, latent, latent), encoder_hidden_states=randn(batch, 77, config[
        "cross_attention_dim"]), text_embeds=randn(batch, pooled), time_ids=randn(batch, 6), target=randn(
        batch, 4, latent, latent))
    timesteps = torch.tensor(TIMESTEPS[:batch], device=device)

    def loss(model, rows):
        added = {"text_embeds": inputs["text_embeds"][rows], "time_ids": inputs["time_ids"][rows]}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out = model(inputs["sample"][rows], timesteps[rows], inputs["encoder_hidden_states"][rows],
                        added_cond_kwargs=added).sample
        return torch.nn.functional.mse_loss(out.float(), inputs["target"][rows].float(), reduction="sum")

    return unet, loss


def peft_copy(unet, network, rank: int):
    """A copy of the UNet (built before T-LoRA was applied) with a PEFT LoRA on the same layers, fp32 parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    names = {id(module): name for name, module in unet.named_modules()}
    targets = sorted(names[id(lora.org_module[0])] for lora in network.loras)
    network.restore()
    twin = copy.deepcopy(unet)
    network.apply_to()
    twin = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), twin)
    parameters = [p for name, p in twin.named_parameters() if "lora_" in name]
    for parameter in parameters:
        parameter.data = parameter.data.float()
        parameter.requires_grad_(True)
    return twin, parameters


class SavedBytes:
    """Bytes autograd saves for backward while entered (each storage counted once)."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    @contextlib.contextmanager
    def counting(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
            yield self


def step(name, unet, twin, loss, batch, rank):
    """One training step of variant `name`; returns the bytes saved for backward at its largest backward."""
    from lycoris.modules.tlora import clear_timestep_mask, compute_timestep_mask, set_timestep_mask

    saved = []
    if name == "tlora_hooks":
        with SavedBytes().counting() as counter:
            value = loss(unet, slice(None))
        saved.append(counter.total)
        value.backward()
    elif name == "lycoris_loop":
        for b in range(batch):
            set_timestep_mask(compute_timestep_mask(TIMESTEPS[b], 1000, rank).to(next(unet.parameters()).device))
            try:
                with SavedBytes().counting() as counter:
                    value = loss(unet, slice(b, b + 1))
                saved.append(counter.total)
                value.backward()
            finally:
                clear_timestep_mask()
    else:
        with SavedBytes().counting() as counter:
            value = loss(twin, slice(None))
        saved.append(counter.total)
        value.backward()
    return max(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="default: full on CUDA, cpu on the CPU")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = args.size or ("full" if device == "cuda" else "cpu")
    import logging

    from tlora_hooks import enable_tlora

    logging.getLogger("lycoris").setLevel(logging.WARNING)
    unet, loss = build(size, args.batch, device)
    twin_source = unet
    network = add_tlora(unet, ["Attention", "FeedForward"], args.rank, device)
    network.requires_grad_(True)
    twin, peft_parameters = peft_copy(twin_source, network, args.rank)
    tlora_parameters = [p for p in network.parameters() if p.requires_grad]
    grads, resolved = {}, {}

    def run(name):
        # enabled outside the timed step, as a training script enables once before its loop
        handle = enable_tlora(unet, max_rank=args.rank) if name == "tlora_hooks" else None
        synchronize(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start, cpu_start = time.perf_counter(), time.process_time()
        saved = step(name, unet, twin, loss, args.batch, args.rank)
        synchronize(device)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        if handle is not None:
            resolved.update(handle.mode)
            handle.remove()
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        parameters = peft_parameters if name == "peft_lora" else tlora_parameters
        grads[name] = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in parameters]
        for parameter in parameters:
            parameter.grad = None
        return seconds, cpu_seconds, saved, peak

    samples = {name: [] for name in VARIANTS}
    cpu_samples = {name: [] for name in VARIANTS}
    saved_bytes, peaks = {}, {}
    for repetition in range(args.reps + 1):  # the first round is untimed
        order = VARIANTS[repetition % len(VARIANTS):] + VARIANTS[: repetition % len(VARIANTS)]
        for name in order:
            seconds, cpu_seconds, saved, peak = run(name)
            if repetition:
                samples[name].append(seconds)
                cpu_samples[name].append(cpu_seconds)
            saved_bytes[name], peaks[name] = saved, peak
    wall = {name: statistics.median(values) for name, values in samples.items()}
    cpu = {name: statistics.median(values) for name, values in cpu_samples.items()}
    medians = wall if device == "cuda" else cpu  # what the ratios compare
    gradient_difference = max(
        relative_error(ours, reference) for ours, reference in zip(grads["tlora_hooks"], grads["lycoris_loop"])
    )
    result = dict(
        size=size, mode=next(iter(resolved.values()), None), batch=args.batch, rank=args.rank, reps=args.reps,
        tlora_modules=len(network.loras),
        unet_params=sum(p.numel() for p in unet.parameters()), tlora_params=sum(p.numel() for p in tlora_parameters),
        device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        dtype="bf16 autocast" if device == "cuda" else "float32", threads=torch.get_num_threads(),
        torch=torch.__version__, diffusers=version("diffusers"), lycoris=version("lycoris-lora"), peft=version("peft"),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        timed="wall" if device == "cuda" else "process cpu time",
        s_per_step={name: round(value, 4) for name, value in medians.items()},
        wall_s_per_step={name: round(value, 4) for name, value in wall.items()},
        samples={name: [round(s, 4) for s in values] for name, values in samples.items()},
        cpu_samples={name: [round(s, 4) for s in values] for name, values in cpu_samples.items()},
        tlora_hooks_vs_lycoris_loop=round(medians["tlora_hooks"] / medians["lycoris_loop"], 3),
        tlora_hooks_vs_peft_lora=round(medians["tlora_hooks"] / medians["peft_lora"], 3),
        saved_for_backward_mib={name: round(value / 2**20, 1) for name, value in saved_bytes.items()},
        peak_gib={name: None if value is None else round(value, 2) for name, value in peaks.items()},
        rel_grad_diff_vs_lycoris_loop=float(f"{gradient_difference:.3g}"),
    )
    print(f"\n{size} UNet, batch {args.batch}, rank {args.rank}, {len(network.loras)} T-LoRA modules on "
          f"{result['device']} ({result['dtype']}, {result['threads']} threads)")
    print(f"{'variant':14s} {'s/step':>9s} {'wall s':>9s} {'vs tlora_hooks':>15s} {'saved MiB':>10s}")
    for name in VARIANTS:
        print(f"{name:14s} {medians[name]:9.4f} {wall[name]:9.4f} {medians[name] / medians['tlora_hooks']:15.2f} "
              f"{saved_bytes[name] / 2**20:10.1f}")
    print(f"tlora_hooks / lycoris_loop = {result['tlora_hooks_vs_lycoris_loop']}, "
          f"tlora_hooks / peft_lora = {result['tlora_hooks_vs_peft_lora']}; "
          f"largest relative gradient difference to the LyCORIS loop: {gradient_difference:.1e}")
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
