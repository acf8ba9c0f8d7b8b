"""A fused fold for CUDA (Triton): W = W0 + (B ⊙ m)·A in one pass, skipped where the mask did not change.

`torch.baddbmm(W0, B, A, out=W)` copies W0 into W, then cuBLAS reads and writes W again: 4 bytes moved per weight
byte. This kernel reads W0 and writes W once (2 bytes, the floor of any fold), with the thin K = 2r product done in
registers in fp32. It also compares the mask with the one it last folded (a device buffer, no host sync) and then
loads and stores nothing, so a second call with the same rank (true CFG, skip-layer passes) costs almost nothing.

Used only for bf16/fp16 weights on CUDA when Triton imports. At enable time each stack times `baddbmm` and
every tile configuration that passes a self-check against it, on its own device, and folds with the fastest: the
first H200 run showed the untuned kernel slower than `baddbmm`, so the kernel has to earn its place per stack.
Anything else, or `TLORA_HOOKS_FUSED_FOLD=0`, uses `baddbmm`.
"""

from __future__ import annotations

import functools
import os

import torch

from ..logging import get_logger

logger = get_logger(__name__)

HALF_DTYPES = (torch.bfloat16, torch.float16)

# (BLOCK_O, BLOCK_I, num_warps, num_stages) tried on the device.
TILE_CONFIGS = ((64, 128, 4, 2), (128, 128, 8, 2), (64, 256, 8, 2), (128, 64, 4, 3))


def wanted() -> bool:
    return os.environ.get("TLORA_HOOKS_FUSED_FOLD", "1") != "0"


def supports(weights: torch.Tensor) -> bool:
    if not wanted() or weights.dtype not in HALF_DTYPES or weights.device.type != "cuda":
        return False
    return triton_kernel() is not None


@functools.cache
def triton_kernel():
    """(triton, the jitted kernel), or None without Triton; imported on first use, so TRITON_INTERPRET is read then."""
    try:
        import triton

        from . import fold_triton
    except ImportError:
        return None
    return triton, fold_triton.fold_kernel


def fused_fold(
    base: torch.Tensor, b: torch.Tensor, a: torch.Tensor, mask: torch.Tensor, previous: torch.Tensor,
    weights: torch.Tensor, config: tuple[int, int, int, int] | None = None,
) -> None:
    """weights[g] = base[g] + (b[g] ⊙ mask)·a[g] for every g whose mask differs from `previous`; then previous = mask.

    base, weights: (G, out, in); b: (G, out, K); a: (G, K, in); mask, previous: (K,); all contiguous.
    `config` is a `TILE_CONFIGS` entry (default: the first).
    """
    triton, kernel = triton_kernel()
    layers, out_features, in_features = weights.shape
    k = b.shape[-1]
    block_k = max(16, min(64, triton.next_power_of_2(k)))
    block_o, block_i, warps, stages = config or TILE_CONFIGS[0]
    grid = (triton.cdiv(in_features, block_i), triton.cdiv(out_features, block_o), layers)
    kernel[grid](
        base, b, a, mask, previous, weights, out_features, in_features,
        K=k, BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    previous.copy_(mask)


def self_check(base: torch.Tensor, b: torch.Tensor, a: torch.Tensor, config: tuple | None = None) -> bool:
    """Whether the kernel (with `config`) matches `baddbmm` on one layer.

    Checked twice, with a mask that turns some ranks off: on a zero base, so the delta itself is compared (a wrong
    product could hide under the rounding of W0 + ΔW), and on the real base.
    """
    try:
        mask = (torch.arange(b.shape[-1], device=b.device) % 3 != 0).to(b.dtype)
        one_b, one_a = b[:1].contiguous(), a[:1].contiguous()
        for one_base in (torch.zeros_like(base[:1]), base[:1].contiguous()):
            expected = torch.baddbmm(one_base, one_b * mask, one_a).float()
            got = torch.empty_like(one_base)
            fused_fold(one_base, one_b, one_a, mask, torch.full_like(mask, float("nan")), got, config)
            error = ((got.float() - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
            if not error <= 1e-2:
                logger.warning("T-LoRA fused fold %s: self-check off by %.2e (relative); not used.", config, error)
                return False
        return True
    except Exception as failure:  # a Triton or driver problem must not break enable_tlora: fall back
        logger.warning("T-LoRA fused fold %s unavailable (%s: %s).", config, type(failure).__name__, failure)
        return False


def fastest_config(
    base: torch.Tensor, b: torch.Tensor, a: torch.Tensor, weights: torch.Tensor
) -> tuple[int, int, int, int] | None:
    """The tile configuration that folds this stack fastest on its device, or None where `baddbmm` is faster.

    Runs once per stack at enable time (it synchronises the device); leaves `weights` equal to `base`.
    """
    mask = torch.ones(b.shape[-1], device=b.device, dtype=b.dtype)
    never_folded = torch.full_like(mask, float("nan"))

    def fused(config):
        return lambda: fused_fold(base, b, a, mask, never_folded.fill_(float("nan")), weights, config)

    candidates = {None: lambda: torch.baddbmm(base, b * mask, a, out=weights)}
    candidates.update({config: fused(config) for config in TILE_CONFIGS if self_check(base, b, a, config)})
    timings = {config: _seconds(run) for config, run in candidates.items()}
    weights.copy_(base)
    best = min(timings, key=timings.get)
    logger.debug("T-LoRA fold %s: %s (%s)", tuple(weights.shape), best or "baddbmm",
                ", ".join(f"{config or 'baddbmm'}: {seconds * 1e3:.3f} ms" for config, seconds in timings.items()))
    return best


def _seconds(run, repeats: int = 5) -> float:
    """Best of `repeats` device timings, after one untimed run (which compiles a Triton configuration)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best
