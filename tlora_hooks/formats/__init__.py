"""One reader per T-LoRA file format, all producing a `TLoraFile`; the format is detected from the keys."""

from __future__ import annotations

import os

import torch

from ..errors import TLoRAError
from ..progress import ProgressArgument, as_progress_bars
from . import controlgenai, lycoris
from .containers import read_tensors
from .locate import FileSource, locate_tlora_file
from .state import BaseTerms, ModuleWeights, TLoraFile, TrainingSettings

# Tried in order; each `detect(keys)` is exclusive of the others.
READERS = (lycoris, controlgenai)
# Scalars a file may hold as integers: LyCORIS's `save_weights(path, None, ...)` keeps an int `linear_alpha` as int64.
INTEGER_SCALAR_SUFFIXES = (f".{lycoris.WEIGHT_KEYS['alpha']}",)
# Key fragments of adapters that are not T-LoRAs, and what loads them.
PLAIN_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.", ".hada_w1", ".lokr_w1", ".oft_")

__all__ = [
    "BaseTerms", "FileSource", "ModuleWeights", "TLoraFile", "TrainingSettings", "check_one_rank", "holds_tlora",
    "read_tlora_file",
]


def read_tlora_file(
    path: str | os.PathLike, source: FileSource | None = None, progress: ProgressArgument = None
) -> TLoraFile:
    """Read any supported T-LoRA file into the common form; raises TLoRAError for anything else.

    Args:
        path: A file, a folder holding one, or a Hub repo id (`formats.locate`).
        source: `weight_name`, `subfolder`, `revision`, ... for a folder or a repo.
        progress: The bars for the download and the read (`progress.ProgressBars`; None: the default ones).
    """
    bars = as_progress_bars(progress)
    path = locate_tlora_file(path, source or FileSource(), holds_tlora, bars)
    tensors, metadata = read_tensors(path, bars)
    keys = list(tensors)
    reader = next((reader for reader in READERS if reader.detect(keys)), None)
    if reader is None:
        raise _not_a_tlora(path, keys)
    tlora_file = reader.read(path, tensors, metadata)
    if not tlora_file.modules:
        raise TLoRAError(f"{path} has T-LoRA-like keys but no complete module (first keys: {keys[:3]}).")
    _check_values(tlora_file, tensors)
    for name, module in tlora_file.modules.items():
        _check_shapes(name, module)
    return tlora_file


def holds_tlora(keys: list[str]) -> bool:
    """Whether a file with these keys is a T-LoRA some reader reads."""
    return any(reader.detect(keys) for reader in READERS)


def check_one_rank(tlora_file: TLoraFile) -> int:
    """The file's rank; a T-LoRA shares one rank schedule, so every module must have it."""
    ranks = tlora_file.ranks
    if len(ranks) > 1:
        counts = {rank: sum(m.rank == rank for m in tlora_file.modules.values()) for rank in ranks}
        examples = {rank: next(n for n, m in tlora_file.modules.items() if m.rank == rank) for rank in ranks}
        raise TLoRAError(
            f"{tlora_file.path} has modules of different ranks "
            f"({', '.join(f'{n} of rank {r}' for r, n in counts.items())}; "
            f"e.g. {examples}). One rank schedule cannot mask them as training did; the file is inconsistent "
            "(mixed files or a conv_dim different from linear_dim are not supported)."
        )
    return ranks[0]


def _check_values(tlora_file: TLoraFile, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor the modules use is floating point and finite, or the pipeline would produce NaN or a rounded
    adapter in silence. One reduction per tensor and one host read for the whole file; the first bad key is named."""
    skipped = set(tlora_file.unknown_keys) | set(tlora_file.unused_keys)
    used = [(key, tensor) for key, tensor in tensors.items() if key not in skipped]
    for key, tensor in used:
        if not tensor.is_floating_point() and not _integer_scalar(key, tensor):
            raise TLoRAError(
                f"{tlora_file.path}: {key} holds {tensor.dtype} values; T-LoRA weights are floating point. "
                "The file is damaged or not a T-LoRA."
            )
    finite = torch.stack([torch.isfinite(_checkable(tensor)).all() for _, tensor in used])
    if not finite.all():
        key = used[int(finite.logical_not().nonzero()[0])][0]
        raise TLoRAError(
            f"{tlora_file.path}: {key} holds NaN or infinite values, which would make every output NaN. "
            "The training run diverged or the file is damaged; use an earlier checkpoint."
        )


def _integer_scalar(key: str, tensor: torch.Tensor) -> bool:
    """An integer (not bool) scalar under a key that may hold one, such as LyCORIS's int64 alpha."""
    integer = not tensor.is_complex() and tensor.dtype != torch.bool
    return integer and tensor.numel() == 1 and key.endswith(INTEGER_SCALAR_SUFFIXES)


def _checkable(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in a dtype `torch.isfinite` takes: float8 has no kernel, so it is upcast (exactly)."""
    return tensor.float() if tensor.is_floating_point() and tensor.element_size() == 1 else tensor


def _check_shapes(name: str, module: ModuleWeights) -> None:
    q, p, lam = module.q, module.p, module.lam
    kernel_ones = all(size == 1 for size in q.shape[2:]) and all(size == 1 for size in p.shape[2:])
    problems = []
    if q.ndim < 2 or q.ndim != p.ndim or not kernel_ones:
        problems.append("q and p must be matrices or 1x1 convolutions of the same kind")
    elif p.shape[1] != q.shape[0] or lam.numel() != q.shape[0]:
        problems.append("their ranks disagree")
    if module.base is not None and (
        module.base.q.shape != q.shape or module.base.p.shape != p.shape or module.base.lam.numel() != lam.numel()
    ):
        problems.append("the saved base terms have other shapes than q, p, lambda")
    if problems:
        raise TLoRAError(
            f"T-LoRA module {module.source_key or name} is malformed: q {tuple(q.shape)}, p {tuple(p.shape)}, "
            f"lambda {tuple(lam.shape)}: {'; '.join(problems)}. The file is damaged or not a T-LoRA."
        )


def _not_a_tlora(path: str, keys: list[str]) -> TLoRAError:
    plain = [key for key in keys if any(marker in key for marker in PLAIN_LORA_MARKERS)]
    if plain:
        return TLoRAError(
            f"{path} is a plain LoRA (keys like {plain[0]!r}), not a T-LoRA: it has no timestep-masked ranks. "
            "Load it with `pipe.load_lora_weights(path)`."
        )
    return TLoRAError(
        f"{path} holds no T-LoRA keys (first keys: {keys[:3]}). Recognised layouts: LyCORIS tlora "
        "(`lycoris_<module>.lambda_layer`, SimpleTuner) and the official ControlGenAI processors "
        "(`<attention>.processor.to_q_lora.{q_layer.weight, ...}` or `{down,up}.weight`)."
    )
