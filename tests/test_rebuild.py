"""The batched base rebuild equals LyCORIS's own SVD init: buffer for buffer with `svd` (LyCORIS's computation,
batched), and in every masked base term within 1e-5 with the default `gram-eigh`."""

from __future__ import annotations

import pytest
import torch
from lycoris.modules.tlora import TLoraModule

from devtools.lycoris_build import lycoris_without_gc
from tlora_hooks.rebuild import DECOMPOSITIONS, principal_base_terms, rebuild_base_terms
from tlora_hooks.tlora_module import TLoraModuleWithoutSvd

LAYERS = {
    "linear_wide": lambda: torch.nn.Linear(48, 16),
    "linear_tall": lambda: torch.nn.Linear(16, 48),
    "linear_rank_above_min_dim": lambda: torch.nn.Linear(6, 5),  # rank 8 > min(out, in): LyCORIS pads
    "conv_1x1": lambda: torch.nn.Conv2d(12, 20, 1),
    "zero_weight": lambda: torch.nn.Linear(16, 16).requires_grad_(False).apply(lambda m: m.weight.zero_()),
    "rank_deficient": lambda: _rank_deficient(),
}


def _rank_deficient():
    layer = torch.nn.Linear(24, 24)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(24, 3) @ torch.randn(3, 24) / 5)
    return layer


def lycoris_module(layer, rank=8):
    with lycoris_without_gc():
        return TLoraModule("x", layer, lora_dim=rank, alpha=rank)


def rebuilt_module(layer, rank=8, method="gram-eigh"):
    with torch.device("meta"):
        module = TLoraModuleWithoutSvd("x", layer, lora_dim=rank, alpha=rank)
    module = module.to_empty(device="cpu")
    rebuild_base_terms([module], method=method, progress=False)
    return module


def masked_base_terms(module) -> torch.Tensor:
    """P_base diag(lambda_base * mask_k) Q_base for every mask k = 1..rank: what the forward subtracts."""
    q = module.base_q.reshape(module.lora_dim, -1).double()
    p = module.base_p.reshape(module.base_p.shape[0], module.lora_dim).double()
    lam = module.base_lambda.reshape(-1).double()
    return torch.stack([(p[:, :k] * lam[:k]) @ q[:k] for k in range(1, module.lora_dim + 1)])


def per_rank_signs(mine: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """+-1 per rank (dim 0 of q-like buffers) aligning `mine` to `reference`: an SVD may flip a singular pair."""
    dots = (mine.reshape(mine.shape[0], -1) * reference.reshape(reference.shape[0], -1)).sum(1)
    return torch.where(dots < 0, -1.0, 1.0)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_svd_method_reproduces_lycoris_buffers_and_layout(layer):
    torch.manual_seed(0)
    built = LAYERS[layer]()
    reference, mine = lycoris_module(built), rebuilt_module(built, method="svd")
    assert all(getattr(mine, n).shape == getattr(reference, n).shape for n in ("base_q", "base_p", "base_lambda"))
    torch.testing.assert_close(mine.base_lambda, reference.base_lambda, atol=1e-7, rtol=1e-6)
    if layer != "zero_weight":  # singular vectors of a zero matrix are arbitrary in any implementation
        signs = per_rank_signs(mine.base_q, reference.base_q)
        kernel = (1,) * (mine.base_q.ndim - 2)
        torch.testing.assert_close(mine.base_q * signs.reshape(-1, 1, *kernel), reference.base_q, atol=1e-6, rtol=0)
        torch.testing.assert_close(mine.base_p * signs.reshape(1, -1, *kernel), reference.base_p, atol=1e-6, rtol=0)
    torch.testing.assert_close(masked_base_terms(mine), masked_base_terms(reference), atol=1e-6, rtol=0)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_gram_eigh_gives_lycoris_masked_base_terms(layer):
    torch.manual_seed(0)
    built = LAYERS[layer]()
    reference, mine = lycoris_module(built), rebuilt_module(built)
    torch.testing.assert_close(masked_base_terms(mine), masked_base_terms(reference), atol=1e-5, rtol=0)
    torch.testing.assert_close(mine.base_lambda, reference.base_lambda, atol=1e-5, rtol=1e-5)


def test_gram_eigh_is_closer_to_the_exact_decomposition_than_lycoris_fp32_svd():
    torch.manual_seed(0)
    layer = torch.nn.Linear(160, 320)
    weight = layer.weight.detach().double()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    exact = torch.stack([(u[:, :k] * s[:k]) @ vh[:k] for k in range(1, 33)])
    gram = (masked_base_terms(rebuilt_module(layer, 32)) - exact).abs().max()
    lycoris = (masked_base_terms(lycoris_module(layer, 32)) - exact).abs().max()
    assert gram < lycoris / 10, (float(gram), float(lycoris))


def test_batched_stacks_decompose_like_single_matrices():
    torch.manual_seed(0)
    weights = torch.randn(3, 20, 12)
    for method in DECOMPOSITIONS:
        batched = principal_base_terms(weights, 4, method)
        for index in range(3):
            single = principal_base_terms(weights[index : index + 1], 4, method)
            for mine, theirs in zip(batched, single):
                torch.testing.assert_close(mine[index], theirs[0], atol=1e-6, rtol=0)


def rebuilt_base_terms(layers, rank: int, workers: int) -> list[torch.Tensor]:
    """Each layer's base terms (flattened) after one `rebuild_base_terms` over all of them with `workers` batches at
    once; built under inference mode, whose buffers only inference mode can write."""
    with lycoris_without_gc(), torch.inference_mode():
        device = layers[0].weight.device
        modules = [TLoraModuleWithoutSvd("x", layer, lora_dim=rank, alpha=rank).to(device) for layer in layers]
        rebuild_base_terms(modules, progress=False, workers=workers)
    return [torch.cat([m.base_q.flatten(), m.base_p.flatten(), m.base_lambda.flatten()]) for m in modules]


def test_concurrent_batches_give_the_same_bits_as_one_at_a_time(monkeypatch):
    """Several worker threads over many small batches of several shapes, under the caller's inference mode,
    write exactly what a sequential rebuild writes."""
    import tlora_hooks.rebuild as rebuild

    torch.manual_seed(0)
    layers = [torch.nn.Linear(*shape) for shape in [(24, 16)] * 5 + [(16, 24)] * 4 + [(12, 12)] * 3]
    monkeypatch.setattr(rebuild, "CHUNK_BYTES", 3 * rebuild.working_bytes((24, 24)))  # 1-3 matrices per batch
    for one, other in zip(rebuilt_base_terms(layers, 8, 1), rebuilt_base_terms(layers, 8, 3)):
        assert torch.equal(one, other)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_streams_give_the_same_bits_as_one_stream():
    """Each worker on its own CUDA stream, ordered after the caller's: the same bits as one stream."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(*shape, device="cuda") for shape in [(320, 320)] * 6 + [(640, 320)] * 5]
    for one, other in zip(rebuilt_base_terms(layers, 16, 1), rebuilt_base_terms(layers, 16, 4)):
        assert torch.equal(one, other)
