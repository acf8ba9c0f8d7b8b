"""An opt-in cache of the rebuilt T-LoRA base terms, so a second `load_tlora` of the same file skips the rebuild.

One safetensors file per (T-LoRA file, base weights): `<file stem>.tlora-base-<key16>.safetensors`, holding each
rebuilt module's `base_q`, `base_p`, `base_lambda` exactly as the rebuild stored them. The key hashes the T-LoRA
file's bytes, the matched layers' weights (names, shapes, dtypes, devices and an integer checksum of the values,
computed on their own device), the rank and the decomposition: a different file or a changed base misses. A cache
that cannot be read or written never fails the load: it warns and rebuilds.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import TYPE_CHECKING, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import rebuild
from .errors import TLoRAError
from .formats.state import BASE_TERM_NAMES
from .logging import get_logger
from .progress import ProgressBars

if TYPE_CHECKING:
    from lycoris.modules.tlora import TLoraModule

logger = get_logger(__name__)

CacheArgument = Union[bool, str, os.PathLike, None]

# Bump when the file layout or the key changes: older files then miss and are overwritten.
CACHE_FORMAT_VERSION = "1"
CACHE_FORMAT = "tlora-hooks-base-cache"
FILE_INFIX = ".tlora-base-"
KEY_CHARACTERS = 16
HASH_CHUNK_BYTES = 1 << 20
# Integer views of a weight's bytes, by element size: the checksum reads bits, so it is exact for every dtype.
INTEGER_VIEWS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Odd multipliers of a splitmix-style mix of the position (as signed int64).
MIX_1 = -0x61C8864680B583EB
MIX_2 = -0x40A7B892E31B1A47


def check_cache_argument(cache_base: CacheArgument) -> None:
    """`cache_base` is False/None (off), True (beside the file) or a folder path; anything else is a TLoRAError."""
    if cache_base is None or isinstance(cache_base, bool):
        return
    if not isinstance(cache_base, (str, os.PathLike)) or not os.fspath(cache_base):
        raise TLoRAError(
            f"cache_base must be False (no cache), True (beside the T-LoRA file) or a folder path, got {cache_base!r}."
        )
    folder = os.fspath(cache_base)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise TLoRAError(f"cache_base={folder!r} is a file, not a folder: pass the folder to keep the base cache in.")


def cache_folder(cache_base: CacheArgument, tlora_path: str) -> str | None:
    """Where the cache lives: None (off), the folder holding the T-LoRA file, or the folder passed."""
    if cache_base is None or cache_base is False:
        return None
    if cache_base is True:
        return os.path.dirname(os.path.abspath(tlora_path))
    return os.fspath(cache_base)


@torch.no_grad()
def fill_base_terms(
    modules: Sequence[TLoraModule], tlora_path: str, folder: str | None, progress: ProgressBars | None = None
) -> None:
    """Rebuild the modules' base terms from their layers' current weights, or read them from the cache in `folder`;
    `progress` is the rebuild bar's settings."""
    method = rebuild.DEFAULT_DECOMPOSITION
    if folder is None:
        rebuild.rebuild_base_terms(modules, method=method, progress=progress)
        return
    key = cache_key(modules, tlora_path, method)
    path = os.path.join(folder, f"{os.path.splitext(os.path.basename(tlora_path))[0]}{FILE_INFIX}"
                                f"{key[:KEY_CHARACTERS]}.safetensors")
    if os.path.exists(path):
        problem = _read_into(modules, path, key, method)
        if problem is None:
            logger.info("Read the T-LoRA base terms of %d modules from the cache %s", len(modules), path)
            return
        logger.warning("%s is not a usable T-LoRA base cache (%s): rebuilding the base terms and overwriting it.",
                       path, problem)
    rebuild.rebuild_base_terms(modules, method=method, progress=progress)
    _write(modules, path, key, method, os.path.basename(tlora_path))


def cache_key(modules: Sequence[TLoraModule], tlora_path: str, method: str) -> str:
    """sha256 over the format version, the file's bytes, the method and every module's rank and weight fingerprint."""
    digest = hashlib.sha256(f"{CACHE_FORMAT} {CACHE_FORMAT_VERSION}\nmethod {method}\n".encode())
    digest.update(f"file {file_sha256(tlora_path)}\n".encode())
    ordered = sorted(modules, key=lambda module: module.lora_name)
    weights = [module.org_module[0].weight.detach() for module in ordered]
    for module, weight, checksum in zip(ordered, weights, weight_checksums(weights)):
        digest.update(
            f"{module.lora_name} {module.lora_dim} {tuple(weight.shape)} {weight.dtype} {weight.device.type} "
            f"{checksum}\n".encode()
        )
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weight_checksums(weights: Sequence[torch.Tensor]) -> list[int]:
    """One int64 per tensor: sum of (bits of element i) * odd_i, mod 2^64, computed on the tensor's device.

    Integer arithmetic is exact and order-free, so the sum is deterministic; each odd_i is invertible mod 2^64, so
    changing any one element always changes the sum. Values stay on their device: one host transfer per device.
    """
    multipliers: dict[tuple[int, torch.device], torch.Tensor] = {}
    sums: dict[torch.device, list[torch.Tensor]] = {}
    places = []
    for weight in weights:
        bits = weight.contiguous().view(INTEGER_VIEWS[weight.element_size()]).reshape(-1).to(torch.int64)
        slot = (bits.numel(), bits.device)
        if slot not in multipliers:
            multipliers[slot] = odd_multipliers(*slot)
        on_device = sums.setdefault(weight.device, [])
        places.append((weight.device, len(on_device)))
        on_device.append((bits * multipliers[slot]).sum())
    on_host = {device: torch.stack(values).tolist() for device, values in sums.items()}
    return [on_host[device][index] for device, index in places]


def odd_multipliers(count: int, device: torch.device) -> torch.Tensor:
    """A position-dependent odd int64 per element (a mixed counter), so moved or swapped values change the sum."""
    mixed = torch.arange(count, dtype=torch.int64, device=device) * MIX_1
    mixed = (mixed ^ (mixed >> 29)) * MIX_2
    return (mixed ^ (mixed >> 32)) | 1


def _read_into(modules: Sequence[TLoraModule], path: str, key: str, method: str) -> str | None:
    """Copy the cached terms into the modules; the reason the file is unusable, or None when they were copied."""
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            expected = {"format": CACHE_FORMAT, "version": CACHE_FORMAT_VERSION, "key": key, "method": method}
            wrong = [name for name, value in expected.items() if metadata.get(name) != value]
            if wrong:
                return f"its {', '.join(wrong)} metadata does not match this load"
            names = {f"{module.lora_name}.{buffer}" for module in modules for buffer in BASE_TERM_NAMES}
            if set(handle.keys()) != names:
                return f"it holds other modules ({len(set(handle.keys()))} tensors, expected {len(names)})"
            cached = {}
            for module in modules:
                for buffer in BASE_TERM_NAMES:
                    tensor = handle.get_tensor(f"{module.lora_name}.{buffer}")
                    target = getattr(module, buffer)
                    if tensor.shape != target.shape or tensor.dtype != target.dtype:
                        return (f"{module.lora_name}.{buffer} is {tuple(tensor.shape)} {tensor.dtype}, "
                                f"expected {tuple(target.shape)} {target.dtype}")
                    cached[module.lora_name, buffer] = tensor
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        return f"it cannot be read: {error}"
    if metadata.get("content_sha256") != _content_sha256(cached):
        return "its tensors do not match their checksum (the file is corrupt)"
    by_name = {module.lora_name: module for module in modules}
    for (name, buffer), tensor in cached.items():
        getattr(by_name[name], buffer).copy_(tensor)
    return None


def _write(modules: Sequence[TLoraModule], path: str, key: str, method: str, source: str) -> None:
    """Write atomically (a temporary file in the same folder, then `os.replace`); warn and go on where it fails."""
    tensors = {
        f"{module.lora_name}.{buffer}": getattr(module, buffer).detach().to("cpu", copy=True).contiguous()
        for module in modules for buffer in BASE_TERM_NAMES
    }
    metadata = {
        "format": CACHE_FORMAT, "version": CACHE_FORMAT_VERSION, "key": key, "method": method,
        "rank": str(sorted({module.lora_dim for module in modules})), "source": source,
        "content_sha256": _content_sha256({tuple(name.rsplit(".", 1)): t for name, t in tensors.items()}),
    }
    folder = os.path.dirname(path)
    temporary = None
    try:
        os.makedirs(folder, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=".tlora-base-", suffix=".tmp", dir=folder)
        os.close(descriptor)
        save_file(tensors, temporary, metadata)
        os.replace(temporary, path)
    except (OSError, SafetensorError) as error:
        if temporary is not None and os.path.exists(temporary):
            os.remove(temporary)
        logger.warning(
            "Could not write the T-LoRA base cache %s (%s); the load goes on, and the next one rebuilds again. "
            "Pass cache_base= a writable folder.", path, error,
        )
        return
    logger.info("Wrote the T-LoRA base terms of %d modules to the cache %s", len(modules), path)


def _content_sha256(tensors: dict[tuple[str, str], torch.Tensor]) -> str:
    """sha256 of the tensors' bytes in name order: a flipped bit inside the data, which safetensors does not check."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()
