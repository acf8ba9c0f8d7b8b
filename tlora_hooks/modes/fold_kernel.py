"""A fused fold for CUDA (Triton): W = W0 + (B ⊙ m)·A in one pass, skipped where the mask did not change.

`torch.baddbmm(W0, B, A, out=W)` copies W0 into W, then cuBLAS reads and writes W again: 4 bytes moved per weight
byte. This kernel reads W0 and writes W once (2 bytes, the floor of any fold), with the thin K = 2r product done in
registers in fp32. It also compares the mask with the one it last folded (a device buffer, no host sync) and then
loads and stores nothing, so a second call with the same rank (true CFG, skip-layer passes) costs almost nothing.

Used only for bf16/fp16 weights on CUDA when Triton imports, and only after a self-check against `baddbmm` on the
group's first layer; anything else, or `TLORA_HOOKS_FUSED_FOLD=0`, uses `baddbmm`.
"""

from __future__ import annotations

import functools
import os

import torch

from ..logging_utils import get_logger

logger = get_logger(__name__)

HALF_DTYPES = (torch.bfloat16, torch.float16)


def wanted() -> bool:
    return os.environ.get("TLORA_HOOKS_FUSED_FOLD", "1") != "0"


def interpreted() -> bool:
    """Triton's CPU interpreter (`TRITON_INTERPRET=1`), which the tests use where no GPU is present."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def supports(weights: torch.Tensor) -> bool:
    if not wanted() or weights.dtype not in HALF_DTYPES or (weights.device.type != "cuda" and not interpreted()):
        return False
    return _kernel() is not None


@functools.cache
def _kernel():
    """(triton, the jitted kernel), or None without Triton; imported on first use, so TRITON_INTERPRET is read then."""
    try:
        import triton

        from . import fold_triton
    except ImportError:
        return None
    return triton, fold_triton.fold_kernel


def fused_fold(
    base: torch.Tensor, b: torch.Tensor, a: torch.Tensor, mask: torch.Tensor, previous: torch.Tensor,
    weights: torch.Tensor,
) -> None:
    """weights[g] = base[g] + (b[g] ⊙ mask)·a[g] for every g whose mask differs from `previous`; then previous = mask.

    base, weights: (G, out, in); b: (G, out, K); a: (G, K, in); mask, previous: (K,); all contiguous.
    """
    triton, kernel = _kernel()
    layers, out_features, in_features = weights.shape
    k = b.shape[-1]
    block_k = max(16, min(64, triton.next_power_of_2(k)))
    block_o, block_i, warps = (32, 32, 4) if interpreted() else (64, 128, 4)
    grid = (triton.cdiv(in_features, block_i), triton.cdiv(out_features, block_o), layers)
    kernel[grid](
        base, b, a, mask, previous, weights, out_features, in_features,
        K=k, BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_K=block_k, num_warps=warps,
    )
    previous.copy_(mask)


def self_check(base: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> bool:
    """Whether the kernel matches `baddbmm` on one layer (else the group uses `baddbmm`).

    Checked twice, with a mask that turns some ranks off: on a zero base, so the delta itself is compared (a wrong
    product could hide under the rounding of W0 + ΔW), and on the real base.
    """
    try:
        mask = (torch.arange(b.shape[-1], device=b.device) % 3 != 0).to(b.dtype)
        one_b, one_a = b[:1].contiguous(), a[:1].contiguous()
        for one_base in (torch.zeros_like(base[:1]), base[:1].contiguous()):
            expected = torch.baddbmm(one_base, one_b * mask, one_a).float()
            got = torch.empty_like(one_base)
            fused_fold(one_base, one_b, one_a, mask, torch.full_like(mask, float("nan")), got)
            error = ((got.float() - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
            if not error <= 1e-2:
                logger.warning("T-LoRA fused fold: self-check off by %.2e (relative); using baddbmm.", error)
                return False
        return True
    except Exception as failure:  # a Triton or driver problem must not break enable_tlora: fall back
        logger.warning("T-LoRA fused fold unavailable (%s: %s); using baddbmm.", type(failure).__name__, failure)
        return False
