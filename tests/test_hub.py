"""Hub ids load as `load_lora_weights` resolves them: offline from a Hub cache the test lays out (refs + snapshots),
with `subfolder`, a non-main `revision`, `cache_dir` and `local_files_only`; a folder or repo without `weight_name`
gives its only T-LoRA file; every failure is a TLoRAError that leaves the pipeline as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import save_file

import tiny
import tlora_files
from tlora_hooks import TLoRAError, load_tlora
from tlora_hooks.commands import main
from tlora_hooks.discovery import applied_tlora_modules
from tlora_hooks.formats import FileSource, read_tlora_file
from tlora_hooks.hooks import installed_hook
from tlora_hooks.records import loaded_adapters

SCHEDULE = dict(tlora_min_rank=2, tlora_alpha=0.5)
REPO = "user/tlora"
MAIN, V2 = "a" * 40, "b" * 40  # commits of the main branch and of the branch `v2`
FILE = "pytorch_lora_weights.safetensors"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tlora_file(path, rank: int, seed: int) -> str:
    """A SimpleTuner T-LoRA of `rank` for the tiny SDXL UNet, its values set by `seed`."""
    pipe, _ = tiny.sdxl(rank=None)
    network = tiny.add_tlora(pipe.unet, rank, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tlora_files.simpletuner_file(network, path, linear_dim=rank, **SCHEDULE)
    network.restore()
    return str(path)


def plain_lora_file(path) -> str:
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 8)}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three distinguishable T-LoRA files and a plain LoRA, outside any cache."""
    folder = tmp_path_factory.mktemp("files")
    return {
        "main": tlora_file(folder / "main.safetensors", 8, seed=1),
        "v2": tlora_file(folder / "v2.safetensors", 4, seed=2),
        "sub": tlora_file(folder / "sub.safetensors", 6, seed=3),
        "plain": plain_lora_file(folder / "plain.safetensors"),
    }


def lay_out_cache(cache, files) -> str:
    """huggingface_hub's cache layout: `models--user--tlora/{refs/<branch>, snapshots/<commit>/<path>}`."""
    repo = cache / "models--user--tlora"
    snapshots = {
        MAIN: {FILE: files["main"], f"style/{FILE}": files["sub"]},
        V2: {FILE: files["v2"]},
    }
    for commit, contents in snapshots.items():
        for name, source in contents.items():
            target = repo / "snapshots" / commit / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(open(source, "rb").read())
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v2").write_text(V2)
    return str(cache)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, files):
    return lay_out_cache(tmp_path_factory.mktemp("hub_cache"), files)


@pytest.fixture
def offline(monkeypatch, cache):
    """huggingface_hub offline, reading the test's cache: its module constants, as HF_HUB_OFFLINE / HF_HUB_CACHE
    set them at import (the subprocess test sets the variables themselves)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    return cache


def loaded(pipe):
    """What is loaded on the UNet: the resolved file and the modules' ranks."""
    record = loaded_adapters(pipe.unet).records["default"]
    return record.path, {module.lora_dim for module in record.network.loras}


def pipeline_state(pipe):
    unet = pipe.unet
    return (installed_hook(unet), loaded_adapters(unet),
            [id(module) for module in applied_tlora_modules(unet)])


def output(pipe, kw):
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    return pipe(**kw, latents=latents, return_dict=False)[0]


# -- offline, from the cache ------------------------------------------------------------------------------------
def test_a_repo_id_loads_the_cached_file_as_the_local_file_does(offline, files):
    pipe, kw = tiny.sdxl(rank=None, steps=2)
    load_tlora(pipe, files["main"])
    reference = output(pipe, kw)
    fresh, _ = tiny.sdxl(rank=None, steps=2)
    load_tlora(fresh, REPO, weight_name=FILE)
    path, ranks = loaded(fresh)
    assert path == os.path.join(offline, "models--user--tlora", "snapshots", MAIN, FILE) and ranks == {8}
    torch.testing.assert_close(output(fresh, kw), reference, rtol=0, atol=0)


@pytest.mark.parametrize("revision", ["v2", V2], ids=["branch", "commit"])
def test_a_non_main_revision_loads_that_revision(offline, revision):
    pipe, _ = tiny.sdxl(rank=None, steps=2)
    load_tlora(pipe, REPO, weight_name=FILE, revision=revision)
    assert loaded(pipe) == (os.path.join(offline, "models--user--tlora", "snapshots", V2, FILE), {4})


def test_a_subfolder_is_joined_to_the_weight_name(offline):
    pipe, _ = tiny.sdxl(rank=None, steps=2)
    load_tlora(pipe, REPO, weight_name=FILE, subfolder="style")
    assert loaded(pipe) == (os.path.join(offline, "models--user--tlora", "snapshots", MAIN, "style", FILE), {6})


def test_cache_dir_and_local_files_only_read_that_cache_without_the_network(monkeypatch, tmp_path, cache):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda *a, **k: pytest.fail("listed the repo online"))
    pipe, _ = tiny.sdxl(rank=None, steps=2)
    load_tlora(pipe, REPO, weight_name=FILE, revision="v2", cache_dir=cache, local_files_only=True)
    assert loaded(pipe)[0].startswith(cache) and loaded(pipe)[1] == {4}
    with pytest.raises(TLoRAError, match="offline.*pass weight_name="):
        load_tlora(pipe, REPO, cache_dir=cache, local_files_only=True)


@pytest.mark.parametrize("call", [
    dict(path=REPO),
    dict(path="user/missing", weight_name=FILE),
    dict(path=REPO, weight_name="other.safetensors"),
    dict(path=REPO, weight_name=FILE, revision="v3"),
    dict(path=REPO, weight_name=FILE, subfolder="nope"),
], ids=["no_weight_name", "missing_repo", "missing_file", "missing_revision", "missing_subfolder"])
def test_offline_failures_are_clear_and_leave_the_loaded_pipeline_as_it_was(offline, files, call):
    pipe, kw = tiny.sdxl(rank=None, steps=2)
    load_tlora(pipe, files["v2"])
    before, state = output(pipe, kw), pipeline_state(pipe)
    words = "pass weight_name=" if "weight_name" not in call else "not in the Hub cache.*HF_HUB_OFFLINE=1"
    with pytest.raises(TLoRAError, match=words):
        load_tlora(pipe, **call)
    assert pipeline_state(pipe) == state
    assert torch.equal(output(pipe, kw), before)


def test_cli_reads_hub_variables_set_before_huggingface_hub_is_imported(cache, tmp_path):
    """A fresh process: HF_HUB_OFFLINE and HF_HUB_CACHE are read by huggingface_hub when it is imported."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": cache, "PYTHONPATH": REPO_ROOT}
    result = subprocess.run(
        [sys.executable, "-m", "tlora_hooks", "inspect", REPO, "--weight-name", FILE, "--revision", "v2", "--json"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["file"] == os.path.join(cache, "models--user--tlora", "snapshots", V2, FILE)
    assert summary["ranks"] == [4] and summary["min_rank"] == 2


def test_cli_convert_takes_its_input_from_the_hub(offline, files, tmp_path, capsys):
    target = str(tmp_path / "converted.safetensors")
    assert main(["convert", REPO, target, "--subfolder", "style", "--weight-name", FILE]) == 0
    converted, original = read_tlora_file(target), read_tlora_file(files["sub"])
    assert converted.modules.keys() == original.modules.keys() and converted.ranks == [6]
    for name, module in original.modules.items():
        assert torch.equal(converted.modules[name].q, module.q)
    assert main(["inspect", REPO]) == 2
    assert "pass --weight-name (the file's name" in capsys.readouterr().err


def test_cli_errors_name_the_cli_options(online_repo, files, monkeypatch, capsys):
    """The command line's messages say --weight-name, --token, ... where load_tlora's say weight_name=, token=."""
    folder, _ = online_repo
    put(folder, "first.safetensors", files["main"])
    put(folder, "second.safetensors", files["v2"])
    assert main(["inspect", REPO]) == 2
    assert "several T-LoRA files: first.safetensors, second.safetensors. Pass --weight-name" in capsys.readouterr().err

    def refuse(*args, **kwargs):
        raise hub_error(RepositoryNotFoundError)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    assert main(["inspect", REPO, "--weight-name", FILE]) == 2
    assert "a private one needs --token, or `hf auth login`" in capsys.readouterr().err
    with pytest.raises(TLoRAError, match="a private one needs token=, or"):
        read_tlora_file(REPO, FileSource(weight_name=FILE))


# -- online answers, from a stand-in for the Hub -----------------------------------------------------------------
def hub_error(cls):
    """huggingface_hub's error as the Hub's answer raises it (its HTTP response is not needed here)."""
    error = cls.__new__(cls)
    Exception.__init__(error, "the Hub's own message")
    return error


@pytest.mark.parametrize("error, words", [
    (RepositoryNotFoundError, "the Hub has no repo user/tlora.*token="),
    (GatedRepoError, "gated repo.*token="),
    (RevisionNotFoundError, "has no revision 'v9'"),
    (RemoteEntryNotFoundError, r"has no file pytorch_lora_weights.safetensors: check weight_name= and subfolder="),
], ids=["repository", "gated", "revision", "file"])
def test_the_hubs_answers_become_clear_errors_and_change_nothing(monkeypatch, files, error, words):
    def refuse(*args, **kwargs):
        raise hub_error(error)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    pipe, kw = tiny.sdxl(rank=None, steps=2)
    load_tlora(pipe, files["v2"])
    state = pipeline_state(pipe)
    with pytest.raises(TLoRAError, match=words):
        load_tlora(pipe, REPO, weight_name=FILE, revision="v9")
    assert pipeline_state(pipe) == state


@pytest.fixture
def online_repo(monkeypatch, tmp_path):
    """A stand-in Hub whose repo holds a folder's files: `list_repo_files`, the safetensors header and the download
    read that folder; the calls are recorded."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    folder = tmp_path / "repo"
    calls = []

    def list_repo_files(repo, revision=None, token=None, **_):
        calls.append(("list", repo, revision, token))
        return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())

    def parse_safetensors_file_metadata(repo, filename, revision=None, token=None, **_):
        calls.append(("header", filename, token))
        with open(folder / filename, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        header.pop("__metadata__", None)
        return type("Metadata", (), {"tensors": header})

    def hf_hub_download(repo, filename, subfolder=None, revision=None, token=None, **_):
        calls.append(("download", filename, subfolder, revision, token))
        return str(folder / (subfolder or "") / filename)

    for stand_in in (list_repo_files, parse_safetensors_file_metadata, hf_hub_download):
        monkeypatch.setattr(huggingface_hub, stand_in.__name__, stand_in)
    return folder, calls


def put(folder, name, source):
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(open(source, "rb").read())


def test_without_weight_name_the_repos_only_tlora_file_is_taken(online_repo, files):
    folder, calls = online_repo
    put(folder, "plain_lora.safetensors", files["plain"])  # a plain LoRA beside it is no candidate
    put(folder, "tlora_v2.safetensors", files["v2"])
    put(folder, "style/tlora.safetensors", files["sub"])  # a subfolder's file is no candidate at the top
    pipe, _ = tiny.sdxl(rank=None, steps=2)
    load_tlora(pipe, REPO, revision="v2")
    assert loaded(pipe)[1] == {4}
    assert calls[0] == ("list", REPO, "v2", None)
    assert calls[-1] == ("download", "tlora_v2.safetensors", None, "v2", None)
    load_tlora(pipe, REPO, subfolder="style")
    assert loaded(pipe)[1] == {6}


def test_token_reaches_every_hub_call(online_repo, files):
    """The listing, the headers that pick the T-LoRA among several files, and the download, from load_tlora and from
    the command line's --token."""
    folder, calls = online_repo
    put(folder, "plain.safetensors", files["plain"])
    put(folder, "tlora.safetensors", files["v2"])
    pipe, _ = tiny.sdxl(rank=None, steps=2)
    load_tlora(pipe, REPO, token="hf_secret")
    assert loaded(pipe)[1] == {4}
    assert calls == [("list", REPO, None, "hf_secret"), ("header", "plain.safetensors", "hf_secret"),
                     ("header", "tlora.safetensors", "hf_secret"),
                     ("download", "tlora.safetensors", None, None, "hf_secret")]
    calls.clear()
    assert main(["inspect", REPO, "--token", "hf_other"]) == 0
    assert {call[-1] for call in calls} == {"hf_other"} and len(calls) == 4


def test_several_tlora_files_in_a_repo_are_an_error_naming_them(online_repo, files):
    folder, calls = online_repo
    put(folder, "first.safetensors", files["main"])
    put(folder, "second.safetensors", files["v2"])
    pipe, _ = tiny.sdxl(rank=None, steps=2)
    with pytest.raises(TLoRAError, match="several T-LoRA files: first.safetensors, second.safetensors.*weight_name="):
        load_tlora(pipe, REPO)
    assert not [call for call in calls if call[0] == "download"] and pipeline_state(pipe) == (None, None, [])


# -- local folders follow the same rules ------------------------------------------------------------------------
def test_a_folder_without_weight_name_gives_its_only_tlora_file(tmp_path, files):
    put(tmp_path, "adapter.safetensors", files["v2"])
    put(tmp_path, "plain.safetensors", files["plain"])
    put(tmp_path, "optimizer.safetensors", files["main"])  # never an adapter, as in diffusers
    assert read_tlora_file(tmp_path).path == str(tmp_path / "adapter.safetensors")


def test_several_tlora_files_in_a_folder_are_an_error_even_beside_a_trainers_name(tmp_path, files):
    """A trainer's file name (`pytorch_lora_weights.safetensors`) beside another T-LoRA is no reason to guess: the
    error lists both, and the pipeline keeps what it had."""
    put(tmp_path, "adapter.safetensors", files["v2"])
    put(tmp_path, FILE, files["main"])
    pipe, kw = tiny.sdxl(rank=None, steps=2)
    load_tlora(pipe, files["sub"])
    before, state = output(pipe, kw), pipeline_state(pipe)
    with pytest.raises(TLoRAError, match="several T-LoRA files: adapter.safetensors, pytorch_lora_weights.safetensors"
                                         r"\. Pass weight_name= with one of them"):
        load_tlora(pipe, str(tmp_path))
    assert pipeline_state(pipe) == state and torch.equal(output(pipe, kw), before)
    load_tlora(pipe, str(tmp_path), weight_name="adapter.safetensors")
    assert loaded(pipe)[1] == {4}


def test_a_folder_with_weight_name_and_subfolder_joins_them(tmp_path, files):
    put(tmp_path, "style/x.safetensors", files["sub"])
    pipe, _ = tiny.sdxl(rank=None, steps=2)
    load_tlora(pipe, str(tmp_path), subfolder="style", weight_name="x.safetensors")
    assert loaded(pipe) == (str(tmp_path / "style" / "x.safetensors"), {6})
    with pytest.raises(TLoRAError, match="has no file 'y.safetensors'"):
        load_tlora(pipe, str(tmp_path), subfolder="style", weight_name="y.safetensors")
    with pytest.raises(TLoRAError, match="holds no T-LoRA file"):
        load_tlora(pipe, str(tmp_path))
