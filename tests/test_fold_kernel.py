"""The fused Triton fold against `torch.baddbmm`, on CUDA or in Triton's CPU interpreter.

Triton is not a dependency (CUDA builds of torch ship it; it is ~1 GB on CPU), so without it these tests skip: the
fold itself is tested on CPU through `baddbmm` in test_modes.py, and on a GPU each stack self-checks the kernel
against `baddbmm` before using it. The library takes the kernel for CUDA weights only; on CPU these tests run it in
the interpreter, and time the tuning with the host's clock instead of CUDA events.
"""

from __future__ import annotations

import sys
import time

import pytest
import torch

from tlora_hooks.modes import fold_kernel

pytest.importorskip("triton")


@pytest.fixture
def device(monkeypatch):
    if torch.cuda.is_available():
        yield torch.device("cuda")
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the kernel's module is imported
        sys.modules.pop("tlora_hooks.modes.fold_triton", None)
        fold_kernel.triton_kernel.cache_clear()
        monkeypatch.setattr(fold_kernel, "_seconds", host_seconds)
        yield torch.device("cpu")
    sys.modules.pop("tlora_hooks.modes.fold_triton", None)
    fold_kernel.triton_kernel.cache_clear()


def host_seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def half_dtypes(device):
    """Triton's interpreter runs on numpy, which has no bfloat16: it checks the kernel's logic in float16."""
    return [torch.bfloat16, torch.float16] if device.type == "cuda" else [torch.float16]


def factors(device, dtype, layers=3, out_features=40, in_features=72, rank=12):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(layers, out_features, in_features, generator=g).to(device, dtype)
    b = (torch.randn(layers, out_features, 2 * rank, generator=g) * 0.1).to(device, dtype)
    a = torch.randn(layers, 2 * rank, in_features, generator=g).to(device, dtype)
    return base, b, a


def doubled(rank, active, device, dtype):
    mask = (torch.arange(rank) < active).to(device, dtype)
    return torch.cat([mask, mask])


@pytest.mark.parametrize("rank", [4, 12, 64])
def test_fused_fold_matches_baddbmm(device, rank):
    for dtype in half_dtypes(device):
        check_against_baddbmm(device, dtype, rank)


def check_against_baddbmm(device, dtype, rank):
    base, b, a = factors(device, dtype, rank=rank)
    assert fold_kernel.supports(base) == (device.type == "cuda")  # the library folds CPU weights with baddbmm
    for active in (1, rank // 2, rank):
        mask = doubled(rank, active, device, dtype)
        expected = torch.baddbmm(base, b * mask, a)
        weights = torch.empty_like(base)
        fold_kernel.fused_fold(base, b, a, mask, torch.full_like(mask, float("nan")), weights)
        delta, expected_delta = (weights - base).float(), (expected - base).float()
        assert (weights.float() - expected.float()).abs().max() <= 2 ** -7 * expected.float().abs().max()
        torch.testing.assert_close(delta, expected_delta, atol=2e-2 * expected_delta.abs().max().item(), rtol=0)
    assert fold_kernel.self_check(base, b, a)


def test_fused_fold_skips_an_unchanged_mask_and_refolds_a_new_one(device):
    dtype = half_dtypes(device)[-1]
    base, b, a = factors(device, dtype)
    previous = torch.full((24,), float("nan"), device=device, dtype=base.dtype)
    weights = torch.empty_like(base)
    fold_kernel.fused_fold(base, b, a, doubled(12, 5, device, dtype), previous, weights)
    weights.zero_()
    fold_kernel.fused_fold(base, b, a, doubled(12, 5, device, dtype), previous, weights)
    assert torch.count_nonzero(weights) == 0, "same mask: nothing loaded or stored"
    six = doubled(12, 6, device, dtype)
    fold_kernel.fused_fold(base, b, a, six, previous, weights)
    expected = torch.baddbmm(base, b * six, a)
    assert (weights.float() - expected.float()).abs().max() <= 2 ** -7 * expected.float().abs().max()


@pytest.mark.parametrize("config", fold_kernel.TILE_CONFIGS)
def test_every_tile_configuration_matches_baddbmm(device, config):
    """Enable-time tuning may pick any of these; each must fold exactly what baddbmm folds."""
    dtype = half_dtypes(device)[0]
    base, b, a = factors(device, dtype, rank=64)
    mask = doubled(64, 23, device, dtype)
    weights = torch.empty_like(base)
    fold_kernel.fused_fold(base, b, a, mask, torch.full_like(mask, float("nan")), weights, config)
    expected = torch.baddbmm(base.float(), (b * mask).float(), a.float())
    assert (weights.float() - expected).abs().max() <= 2 ** -7 * expected.abs().max()


def test_tuning_leaves_the_weights_at_w0_and_returns_a_usable_choice(device):
    dtype = half_dtypes(device)[0]
    base, b, a = factors(device, dtype)
    weights = base.clone()
    choice = fold_kernel.fastest_config(base, b, a, weights)
    assert torch.equal(weights, base)
    assert choice is None or choice in fold_kernel.TILE_CONFIGS
