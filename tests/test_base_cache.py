"""`load_tlora(..., cache_base=...)`: a second load of the same file onto the same weights reads the rebuilt base
terms from the cache, bit for bit what a rebuild gives; anything else (another file, a changed weight, a damaged
cache) rebuilds; a cache that cannot be written never fails the load; a bad argument changes nothing."""

from __future__ import annotations

import logging
import os
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tiny
import tlora_files
from tlora_hooks import TLoRAError, base_cache, load_tlora, rebuild
from tlora_hooks.discovery import applied_tlora_modules
from tlora_hooks.records import loaded_adapters

SCHEDULE = dict(linear_dim=8, linear_alpha=4, tlora_min_rank=2, tlora_alpha=0.5)


def trained_file(path, seed: int = 0) -> str:
    """A perturbed LyCORIS T-LoRA on tiny SDXL, saved as SimpleTuner does (no base terms: they are rebuilt)."""
    pipe, _ = tiny.sdxl(rank=None)
    network = tiny.add_tlora(pipe.unet, 8, seed=seed)
    tlora_files.simpletuner_file(network, path, **SCHEDULE)
    network.restore()
    return str(path)


@pytest.fixture(scope="module")
def source_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sources")
    return trained_file(folder / "a.safetensors"), trained_file(folder / "b.safetensors", seed=1)


@pytest.fixture
def tlora_path(tmp_path, source_files):
    """A private copy of the file in its own folder, so every test starts without a cache."""
    (tmp_path / "lora").mkdir()
    return shutil.copy(source_files[0], tmp_path / "lora" / "tlora.safetensors")


@pytest.fixture(scope="module")
def uncached(source_files):
    """Output and base terms of a load without cache: the reference every cached load must equal bit for bit."""
    pipe, kw = tiny.sdxl(rank=None, steps=2)
    load_tlora(pipe, source_files[0])
    return run(pipe, kw), base_terms(pipe)


@pytest.fixture
def rebuilds(monkeypatch):
    """Counts the rebuilds (the real function runs)."""
    calls = []
    real = rebuild.rebuild_base_terms

    def counting(modules, **options):
        calls.append(len(modules))
        return real(modules, **options)

    monkeypatch.setattr(rebuild, "rebuild_base_terms", counting)
    return calls


def forbid_rebuild(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the base terms were rebuilt although the cache should have served them")

    monkeypatch.setattr(rebuild, "rebuild_base_terms", fail)


def run(pipe, kw):
    latents = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(1))
    return pipe(**kw, latents=latents, return_dict=False)[0]


def base_terms(pipe) -> dict[str, tuple[torch.Tensor, ...]]:
    return {
        module.lora_name: tuple(getattr(module, name).detach().clone() for name in base_cache.BASE_TERM_NAMES)
        for module in applied_tlora_modules(pipe.unet)
    }


def assert_bit_identical(terms, reference):
    assert terms.keys() == reference.keys()
    for name, tensors in terms.items():
        for mine, theirs in zip(tensors, reference[name]):
            assert mine.dtype == theirs.dtype == torch.float32
            assert torch.equal(mine, theirs), name


def cache_files(folder) -> list[str]:
    return sorted(str(folder / name) for name in os.listdir(folder) if base_cache.FILE_INFIX in name)


def fresh_load(path, cache_base=True, **options):
    pipe, kw = tiny.sdxl(rank=None, steps=2)
    load_tlora(pipe, path, cache_base=cache_base, **options)
    return pipe, kw


# -- hits -------------------------------------------------------------------------------------------------------------

def test_second_load_reads_the_cache_and_gives_the_same_output_bit_for_bit(tlora_path, uncached, monkeypatch, caplog):
    folder = tlora_path.parent
    with caplog.at_level(logging.INFO, logger="tlora_hooks"):
        first, kw = fresh_load(tlora_path)
    [written] = cache_files(folder)
    assert os.path.basename(written).startswith("tlora.tlora-base-") and f"to the cache {written}" in caplog.text
    assert_bit_identical(base_terms(first), uncached[1])
    forbid_rebuild(monkeypatch)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tlora_hooks"):
        second, kw = fresh_load(tlora_path)
    assert f"from the cache {written}" in caplog.text
    assert_bit_identical(base_terms(second), uncached[1])
    assert torch.equal(run(second, kw), uncached[0]) and torch.equal(run(first, kw), uncached[0])
    assert cache_files(folder) == [written]


def test_cached_metadata_records_what_was_built(tlora_path):
    fresh_load(tlora_path)
    [written] = cache_files(tlora_path.parent)
    with safe_open(written, framework="pt") as handle:
        metadata = handle.metadata()
        assert len(list(handle.keys())) == 3 * 40
    assert metadata["format"] == "tlora-hooks-base-cache" and metadata["version"] == base_cache.CACHE_FORMAT_VERSION
    assert metadata["method"] == rebuild.DEFAULT_DECOMPOSITION and metadata["rank"] == "[8]"
    assert written.endswith(f"{metadata['key'][:16]}.safetensors") and metadata["source"] == "tlora.safetensors"


def test_reloading_onto_a_folded_pipeline_still_hits(tlora_path, uncached, monkeypatch):
    """The fold writes the adapter into the weights between calls; the key must be taken from the pristine ones."""
    reference = run(*fresh_load(tlora_path, cache_base=False, mode="fold"))
    pipe, kw = fresh_load(tlora_path, mode="fold")
    run(pipe, kw)
    forbid_rebuild(monkeypatch)
    load_tlora(pipe, tlora_path, cache_base=True, mode="fold")
    assert_bit_identical(base_terms(pipe), uncached[1])
    assert torch.equal(run(pipe, kw), reference)


def test_a_weight_the_file_does_not_wrap_does_not_change_the_key(tlora_path, monkeypatch):
    fresh_load(tlora_path)
    forbid_rebuild(monkeypatch)
    pipe, kw = tiny.sdxl(rank=None, steps=2)
    with torch.no_grad():
        pipe.unet.conv_in.weight[0, 0, 0, 0] += 1.0
    load_tlora(pipe, tlora_path, cache_base=True)


# -- misses -----------------------------------------------------------------------------------------------------------

def wrapped_weight(pipe) -> torch.Tensor:
    return pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_v.weight


def test_one_changed_element_of_one_base_weight_misses_and_rebuilds(tlora_path, rebuilds):
    fresh_load(tlora_path)
    changed, kw = tiny.sdxl(rank=None, steps=2)
    with torch.no_grad():
        weight = wrapped_weight(changed)
        weight[3, 5] = torch.nextafter(weight[3, 5], torch.tensor(float("inf")))  # one ulp
    load_tlora(changed, tlora_path, cache_base=True)
    assert rebuilds == [40, 40] and len(cache_files(tlora_path.parent)) == 2
    reference, _ = tiny.sdxl(rank=None, steps=2)
    with torch.no_grad():
        wrapped_weight(reference).copy_(wrapped_weight(changed))
    load_tlora(reference, tlora_path)
    assert_bit_identical(base_terms(changed), base_terms(reference))


def test_another_file_under_the_same_name_misses(tlora_path, source_files, rebuilds, uncached):
    fresh_load(tlora_path)
    shutil.copy(source_files[1], tlora_path)
    other, kw = fresh_load(tlora_path)
    assert rebuilds == [40, 40] and len(cache_files(tlora_path.parent)) == 2
    assert not torch.equal(run(other, kw), uncached[0])


# -- a damaged cache: warn, rebuild, overwrite ------------------------------------------------------------------------

def _rewrite(path, change):
    with safe_open(path, framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = dict(handle.metadata())
    change(tensors, metadata)
    save_file(tensors, path, metadata)


def _flip_a_data_bit(path):
    with open(path, "r+b") as handle:
        handle.seek(-7, os.SEEK_END)
        byte = handle.read(1)[0]
        handle.seek(-7, os.SEEK_END)
        handle.write(bytes([byte ^ 0x10]))


def _truncate(path):
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


def _first(tensors, suffix):
    return next(key for key in sorted(tensors) if key.endswith(suffix))


DAMAGE = {
    "garbage": (lambda path: open(path, "wb").write(b"not a safetensors file"), "cannot be read"),
    "truncated": (_truncate, "cannot be read"),
    "empty": (lambda path: open(path, "wb").close(), "cannot be read"),
    "flipped_data_bit": (_flip_a_data_bit, "do not match their checksum"),
    "old_version": (lambda path: _rewrite(path, lambda t, m: m.update(version="0")), "version metadata"),
    "other_method": (lambda path: _rewrite(path, lambda t, m: m.update(method="svd")), "method metadata"),
    "no_metadata": (lambda path: _rewrite(path, lambda t, m: m.clear()), "format, version, key, method metadata"),
    "missing_module": (lambda path: _rewrite(path, lambda t, m: t.pop(_first(t, ".base_q"))), "holds other modules"),
    "wrong_shape": (
        lambda path: _rewrite(path, lambda t, m: t.update({_first(t, ".base_q"): t[_first(t, ".base_q")][:-1]})),
        r"base_q is \(7, ",
    ),
    "wrong_dtype": (
        lambda path: _rewrite(path, lambda t, m: t.update({_first(t, ".base_p"): t[_first(t, ".base_p")].double()})),
        "torch.float64, expected",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_cache_warns_rebuilds_and_is_overwritten(tlora_path, uncached, damage, monkeypatch, caplog):
    fresh_load(tlora_path)
    [written] = cache_files(tlora_path.parent)
    spoil, reason = DAMAGE[damage]
    spoil(written)
    rebuilt = []
    real = rebuild.rebuild_base_terms
    monkeypatch.setattr(rebuild, "rebuild_base_terms", lambda modules, **o: rebuilt.append(1) or real(modules, **o))
    with caplog.at_level(logging.WARNING, logger="tlora_hooks"):
        pipe, kw = fresh_load(tlora_path)
    [warning] = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert f"{written} is not a usable T-LoRA base cache" in warning.message
    assert "rebuilding the base terms and overwriting it" in warning.message
    assert re.search(reason, warning.message), warning.message
    assert rebuilt == [1]
    assert_bit_identical(base_terms(pipe), uncached[1])
    assert torch.equal(run(pipe, kw), uncached[0])
    forbid_rebuild(monkeypatch)  # overwritten with a good cache: the next load hits
    assert_bit_identical(base_terms(fresh_load(tlora_path)[0]), uncached[1])
    assert cache_files(tlora_path.parent) == [written]


# -- a folder that cannot be written ----------------------------------------------------------------------------------

def test_a_folder_that_cannot_be_created_warns_and_the_load_succeeds(tlora_path, uncached, caplog):
    blocked = tlora_path.parent / "a_file"
    blocked.write_text("")
    with caplog.at_level(logging.WARNING, logger="tlora_hooks"):
        pipe, kw = fresh_load(tlora_path, cache_base=blocked / "cache")
    assert "Could not write the T-LoRA base cache" in caplog.text and "Pass cache_base=" in caplog.text
    assert torch.equal(run(pipe, kw), uncached[0])


def test_a_failed_write_warns_and_leaves_no_temporary_file(tlora_path, uncached, monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(base_cache, "save_file", refuse)
    with caplog.at_level(logging.WARNING, logger="tlora_hooks"):
        pipe, kw = fresh_load(tlora_path)
    assert "read-only file system" in caplog.text
    assert os.listdir(tlora_path.parent) == ["tlora.safetensors"]
    assert torch.equal(run(pipe, kw), uncached[0])


# -- where the cache goes ---------------------------------------------------------------------------------------------

def test_true_writes_beside_the_file_and_a_path_writes_there(tlora_path, tmp_path):
    fresh_load(tlora_path, cache_base=True)
    assert len(cache_files(tlora_path.parent)) == 1
    elsewhere = tmp_path / "new" / "cache"  # created when missing
    fresh_load(tlora_path, cache_base=str(elsewhere))
    fresh_load(tlora_path, cache_base=elsewhere)  # a PathLike: hits the same file
    assert len(cache_files(elsewhere)) == 1 and len(cache_files(tlora_path.parent)) == 1
    assert os.path.basename(cache_files(elsewhere)[0]) == os.path.basename(cache_files(tlora_path.parent)[0])


def test_off_by_default_and_nothing_cached_when_the_file_saves_its_base(tlora_path, tmp_path, rebuilds):
    fresh_load(tlora_path, cache_base=False)
    assert os.listdir(tlora_path.parent) == ["tlora.safetensors"]
    pipe, _ = tiny.sdxl(rank=None, steps=2)
    state = tlora_files.official_state(pipe.unet, 4, "ortho")
    ortho = tlora_files.save_official_sdxl(state, tmp_path / "o.safetensors")
    load_tlora(pipe, ortho, min_rank=1, cache_base=tmp_path / "ortho_cache")
    assert not (tmp_path / "ortho_cache").exists() and rebuilds == [40]


# -- a bad argument ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [1, 0.5, b"folder", "", ["folder"], "A_FILE"], ids=repr)
def test_a_bad_cache_base_raises_and_changes_nothing(tlora_path, source_files, value, rebuilds):
    pipe, kw = tiny.sdxl(rank=None, steps=2)
    load_tlora(pipe, source_files[1])
    if value == "A_FILE":
        value = str(tlora_path)
    before = (run(pipe, kw), loaded_adapters(pipe.unet), len(applied_tlora_modules(pipe.unet)))
    with pytest.raises(TLoRAError, match="cache_base"):
        load_tlora(pipe, tlora_path, cache_base=value)
    after = (run(pipe, kw), loaded_adapters(pipe.unet), len(applied_tlora_modules(pipe.unet)))
    assert torch.equal(before[0], after[0]) and before[1:] == after[1:]
    assert rebuilds == [40] and os.listdir(tlora_path.parent) == ["tlora.safetensors"]


# -- the weight fingerprint -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn])
def test_the_checksum_changes_with_any_one_element_and_with_a_swap(dtype):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 10, generator=generator).to(dtype)
    [reference] = base_cache.weight_checksums([weight])
    assert base_cache.weight_checksums([weight.clone()]) == [reference]
    bits = weight.view(base_cache.INTEGER_VIEWS[weight.element_size()])
    for index in range(weight.numel()):  # the lowest bit of every element, one at a time
        changed = bits.clone().reshape(-1)
        changed[index] ^= 1
        assert base_cache.weight_checksums([changed.reshape(bits.shape).view(dtype)]) != [reference], index
    swapped = bits.clone()
    swapped[[0, 1]] = bits[[1, 0]]
    assert not torch.equal(swapped, bits)
    assert base_cache.weight_checksums([swapped.view(dtype)]) != [reference]
    assert base_cache.weight_checksums([weight.T.contiguous().T]) == [reference]  # layout does not matter, values do


def test_the_checksum_is_exact_integer_arithmetic():
    """Compared with the same sum done in Python integers mod 2^64."""
    weight = torch.randn(5, 7, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    values = weight.view(torch.int16).reshape(-1).tolist()
    odd = base_cache.odd_multipliers(len(values), torch.device("cpu")).tolist()
    expected = sum(v * m for v, m in zip(values, odd)) % 2**64
    [checksum] = base_cache.weight_checksums([weight])
    assert checksum % 2**64 == expected and all(m % 2 for m in odd)


# -- on CUDA ----------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_key_is_computed_there_and_a_cpu_cache_does_not_serve_it(tlora_path, uncached, monkeypatch):
    fresh_load(tlora_path)  # a CPU rebuild, cached
    pipe, _ = tiny.sdxl(rank=None, steps=2)
    pipe.to("cuda", torch.bfloat16)
    load_tlora(pipe, tlora_path, cache_base=True)  # another device type and dtype: a miss, rebuilt on CUDA
    rebuilt = {name: tuple(t.cpu() for t in terms) for name, terms in base_terms(pipe).items()}
    assert len(cache_files(tlora_path.parent)) == 2
    forbid_rebuild(monkeypatch)
    again, _ = tiny.sdxl(rank=None, steps=2)
    again.to("cuda", torch.bfloat16)
    load_tlora(again, tlora_path, cache_base=True)
    modules = applied_tlora_modules(again.unet)
    assert all(module.base_q.is_cuda for module in modules)
    assert_bit_identical({name: tuple(t.cpu() for t in terms) for name, terms in base_terms(again).items()}, rebuilt)
