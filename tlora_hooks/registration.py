"""T-LoRA networks registered under their denoiser, as PEFT's injected layers are, so torch sees their parameters.

LyCORIS keeps its modules outside the model (`org_module` is a plain list), so `denoiser.parameters()`, `pipe.to(...)`,
`DistributedDataParallel(denoiser)` and `denoiser.state_dict()` miss them. `create_tlora` and `load_tlora` add the
applied network as the child `tlora.<adapter_name>` of the denoiser: its parameters are then named
`tlora.<adapter_name>.lycoris_<layer path>.q_layer.weight`, ... (LyCORIS's own file keys behind the prefix), move and
cast with the denoiser, and are synchronised by data-parallel wrappers. Removing the last adapter removes the child,
so the module tree and the state dict are exactly the original ones again.

accelerate's sequential CPU offload hooks every module holding tensors and keeps its weights on the meta device
outside that module's own forward; LyCORIS reads `q_layer.weight` and `p_layer.weight` without calling those layers.
A pre-hook on the denoiser gives the adapter's modules their weights back before a call, where they were (the
adapter is small; LyCORIS and the modes move it to the call's device), and leaves each a hook that does nothing, so
the forwards accelerate wrapped keep working.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from torch import nn

from .errors import TLoRAError

if TYPE_CHECKING:
    from lycoris import LycorisNetwork

ADAPTERS_ATTRIBUTE = "tlora"


class RegisteredNetworks(nn.ModuleDict):
    """The registered T-LoRA networks of one denoiser, by adapter name."""

    def keep_unloaded_adapters(self, module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
        """A `load_state_dict` pre-hook: a state dict without the adapters' keys (the base model's own, as
        `from_pretrained` files and diffusers' checkpoints hold it) loads into the base and leaves the adapters as they
        are, strict or not; keys it does hold are loaded."""
        for key, value in self.state_dict(prefix=prefix, keep_vars=True).items():
            state_dict.setdefault(key, value)

    def release_from_offload(self, denoiser: nn.Module, args: tuple) -> None:
        """A forward pre-hook on the denoiser: the adapter's modules out of accelerate's weight offloading."""
        for network in self.values():
            hook = network.loras[0].__dict__.get("_hf_hook") if network.loras else None
            if hook is None or type(hook).__name__ == "ModelHook":
                continue
            from accelerate.hooks import ModelHook

            for module in network.modules():
                offloading = module.__dict__.get("_hf_hook")
                if offloading is not None:
                    offloading.detach_hook(module)  # the weights back from accelerate's map
                    module._hf_hook = ModelHook()


def register_network(denoiser: nn.Module, adapter_name: str, network: LycorisNetwork) -> None:
    """Make `network` the child `tlora.<adapter_name>` of `denoiser`."""
    adapters = denoiser._modules.get(ADAPTERS_ATTRIBUTE)
    if adapters is None:
        if ADAPTERS_ATTRIBUTE in denoiser.__dict__ or ADAPTERS_ATTRIBUTE in denoiser._parameters:
            raise TLoRAError(
                f"{type(denoiser).__name__} already has an attribute {ADAPTERS_ATTRIBUTE!r}; the T-LoRA parameters "
                "cannot be registered under it."
            )
        adapters = RegisteredNetworks()
        denoiser.add_module(ADAPTERS_ATTRIBUTE, adapters)
        adapters.__dict__["_release_handle"] = denoiser.register_forward_pre_hook(adapters.release_from_offload)
        adapters.register_load_state_dict_pre_hook(adapters.keep_unloaded_adapters)
    elif not isinstance(adapters, RegisteredNetworks):
        raise TLoRAError(
            f"{type(denoiser).__name__} already has a submodule {ADAPTERS_ATTRIBUTE!r} that tlora_hooks did not add; "
            "the T-LoRA parameters cannot be registered under it."
        )
    adapters[adapter_name] = network


def unregister_network(denoiser: nn.Module, adapter_name: str) -> None:
    """Remove `tlora.<adapter_name>`, and `tlora` itself once empty; a no-op where it is not registered."""
    adapters = denoiser._modules.get(ADAPTERS_ATTRIBUTE)
    if not isinstance(adapters, RegisteredNetworks):
        return
    if adapter_name in adapters:
        del adapters[adapter_name]
    if not len(adapters):
        adapters.__dict__["_release_handle"].remove()
        del denoiser._modules[ADAPTERS_ATTRIBUTE]


@contextmanager
def adapters_hidden(denoiser: nn.Module) -> Iterator[None]:
    """The denoiser without its registered adapters for a while: LyCORIS's presets walk `named_modules()`, where a
    name pattern could otherwise match another adapter's own layers (`tlora.<name>.lycoris_..._attn1_to_q.q_layer`)."""
    adapters = denoiser._modules.get(ADAPTERS_ATTRIBUTE)
    if not isinstance(adapters, RegisteredNetworks):
        yield
        return
    del denoiser._modules[ADAPTERS_ATTRIBUTE]
    try:
        yield
    finally:
        denoiser._modules[ADAPTERS_ATTRIBUTE] = adapters
