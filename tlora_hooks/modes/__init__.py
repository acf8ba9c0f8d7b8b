"""The modes: ways to run the masked forward, each tested against LyCORIS's own (`"lycoris"`).

- `"lycoris"` (`lycoris.py`): LyCORIS's own forward (rebuilds ΔW in every layer on every call): the reference.
- `"low_memory"` (`low_memory.py`): y = layer(x) + (x·A_mᵀ)·B_mᵀ beside the untouched base layer, one factor of each
  stack of same-shaped modules masked per call; any linear-like base (fp8, quantized, offloaded); extra memory: the
  thin factors only.
- `"fold"` (`fold.py`): writes W0 + B·diag(m)·A into the weights once per call (one batched matmul per stack of
  same-shaped weights), then the layers run at plain speed; extra memory: a copy of the folded weights.
- `"auto"` (default, `auto.py`): `"fold"` when the weights are plain float `nn.Linear` with no offloading hook, on a
  device with room for the copy; `"low_memory"` otherwise. Decided at enable time, so every call, the first included,
  runs the same mode. (A per-layer mix, folding many-token layers and bypassing few-token ones, measured slower on an
  H200 for SDXL's 700 modules: the bypass costs Python per module per call. See benchmarks/RESULTS.md.)
Modules no fast mode reproduces (convolutions, dropout active in training mode) stay on LyCORIS's forward: `build.py`
splits a denoiser's modules between the modes, which `combined.py` drives as one.
Training calls (autograd recording, a trainable adapter): `training.py` routes every module of a fast mode into the
per-sample forward (`per_sample.py`), one mask per sample; `"lycoris"` keeps one mask per call.
A mode serves every active adapter of its denoiser: each adapter has its own LyCORIS mask group, and the mode takes
each call's masks by group (`protocol.GroupMasks`); inactive adapters are out of the forward (`chain.OutOfChain`).
"""

from .build import MODES, build_mode, check_mode
from .combined import CombinedMode
from .fold import FoldMode
from .low_memory import LowMemoryMode
from .lycoris import LycorisMode
from .protocol import GroupMasks, GroupModules, MaskMode, ModeFactory

__all__ = [
    "MODES",
    "CombinedMode",
    "FoldMode",
    "GroupMasks",
    "GroupModules",
    "LowMemoryMode",
    "LycorisMode",
    "MaskMode",
    "ModeFactory",
    "build_mode",
    "check_mode",
]
