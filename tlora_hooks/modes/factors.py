"""The masked T-LoRA delta of one LyCORIS module as two thin factors, and which modules the fast modes take."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from lycoris.modules.tlora import TLoraModule

FLOAT_WEIGHTS = (torch.float32, torch.bfloat16, torch.float16)


def delta_factors(module: TLoraModule, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A (2r, in) and B (out, 2r) with B·diag([m, m])·A = LyCORIS's masked ΔW for mask m, multiplier included.

    LyCORIS's ΔW = s·(P·diag(λ⊙m)·Q − P₀·diag(λ₀⊙m)·Q₀) is a difference of two terms as large as the layer's top
    singular components. Written as (Pλ − P₀λ₀)·diag(m)·Q + P₀λ₀·diag(m)·(Q − Q₀), each term is as small as the
    delta itself, so rounding A and B to bf16 costs bf16 precision of the delta, not of the base weight.
    The factors are computed in fp32 and snapshot the module: re-enable after changing its weights or multiplier.
    """
    with torch.no_grad():
        source = module.q_layer.weight.device
        terms = (term.detach().to(source, torch.float32) for term in factor_terms(module))
        a, b = stacked_factors(*terms, scale=float(module.scale) * float(module.multiplier))
        return a.to(device, dtype).contiguous(), b.to(device, dtype).contiguous()


def layer_factors(
    modules: list[TLoraModule], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of every adapter's module on one layer, concatenated along the rank: A (K, in), B (out, K) with
    K = 2·(r₁ + r₂ + ...), so one product gives the sum of their deltas (masked by `signature_mask`)."""
    factors = [delta_factors(module, device, dtype) for module in modules]
    if len(factors) == 1:
        return factors[0]
    return torch.cat([a for a, _ in factors]).contiguous(), torch.cat([b for _, b in factors], dim=1).contiguous()


def factor_terms(module: TLoraModule) -> tuple[torch.Tensor, ...]:
    """Q (r, in), P (out, r), λ (1, r) and their frozen base copies Q₀, P₀, λ₀, as matrices (a convolution's 1×1
    kernels flattened), still attached to autograd."""
    rank = module.lora_dim
    return (
        module.q_layer.weight.reshape(rank, -1), module.p_layer.weight.reshape(-1, rank),
        module.lambda_layer.reshape(1, -1),
        module.base_q.reshape(rank, -1), module.base_p.reshape(-1, rank), module.base_lambda.reshape(1, -1),
    )


def stacked_factors(q, p, lam, q0, p0, lam0, *, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A = [Q; Q − Q₀] (2r, in) and B = s·[Pλ − P₀λ₀, P₀λ₀] (out, 2r): `delta_factors`' form, differentiable in
    Q, P and λ, so training calls use the same two thin matmuls (see `delta_factors` for why this form)."""
    base = p0 * lam0
    return torch.cat([q, q - q0], dim=0), torch.cat([p * lam - base, base], dim=1) * scale


def doubled_mask(mask: torch.Tensor, rank: int) -> torch.Tensor:
    """[m[:r], m[:r]] of a (1, max_rank) mask: the mask of `delta_factors`' 2r stacked ranks, for a rank-r module."""
    return mask[0, :rank].repeat(2)


# The adapters whose modules share one layer, in their order along the concatenated factors: (mask group, rank).
Signature = tuple[tuple[int, int], ...]


def signature_mask(masks: dict[int, torch.Tensor], signature: Signature) -> torch.Tensor:
    """The mask of a layer's adapters' factors concatenated along the rank: each adapter's doubled mask in turn."""
    return torch.cat([doubled_mask(masks[group], rank) for group, rank in signature])


def takes_fast_mode(module: TLoraModule) -> bool:
    """Linear-like modules whose LyCORIS forward is deterministic: the others stay on LyCORIS's own forward.

    Convolutions keep LyCORIS's forward (its 1x1 factors are applied with the layer's stride and padding, which the
    fast modes do not reproduce); so do modules with dropout active in training mode.
    """
    dropout_active = module.training and (module.module_dropout or not isinstance(module.dropout, nn.Identity))
    return module.module_type == "linear" and not module.isconv and not dropout_active


def base_layer(module: TLoraModule) -> nn.Module:
    return module.org_module[0]


def foldable(module: TLoraModule) -> bool:
    """Whether the base layer is a plain floating-point `nn.Linear` whose weight can be rewritten in place.

    Quantized or fp8 layers, layers behind PEFT or offloading hooks (accelerate `_hf_hook`, diffusers group offload)
    and weights on the meta device go to the low_memory mode, which never touches the weight.
    """
    layer = base_layer(module)
    weight = getattr(layer, "weight", None)
    return (
        takes_fast_mode(module)
        and type(layer) is nn.Linear
        and module.peft_wrapper is None
        and type(weight) is nn.Parameter
        and weight.dtype in FLOAT_WEIGHTS
        and weight.device.type != "meta"
        and not has_offload_hook(layer)
    )


# Names of diffusers hooks (`module._diffusers_hook`) that move or recast weights on every call.
WEIGHT_MOVING_HOOKS = ("group_offloading", "lazy_prefetch_group_offloading", "layerwise_casting")


# accelerate hooks that leave the weights where they are: (class name, test on the hook). An AlignDevicesHook
# without `offload` only moves the inputs to its device (`dispatch_model` with a multi-GPU `device_map`).
WEIGHT_KEEPING_ACCELERATE_HOOKS = {"AlignDevicesHook": lambda hook: not hook.offload}


def moves_weights(hook: Any) -> bool:
    """Whether an accelerate hook moves its module's weights per call (any hook it does not know: yes)."""
    parts = getattr(hook, "hooks", None)
    if type(hook).__name__ == "SequentialHook" and parts is not None:
        return any(moves_weights(part) for part in parts)
    keeps = WEIGHT_KEEPING_ACCELERATE_HOOKS.get(type(hook).__name__)
    return keeps is None or not keeps(hook)


def has_offload_hook(module: nn.Module) -> bool:
    """Whether accelerate (`_hf_hook`: cpu offload) or a diffusers hook moves or recasts its weights per call."""
    if hasattr(module, "_hf_hook") and moves_weights(module._hf_hook):
        return True
    registry = getattr(module, "_diffusers_hook", None)
    hooks = getattr(registry, "hooks", {})
    return any(name in hooks for name in WEIGHT_MOVING_HOOKS)
