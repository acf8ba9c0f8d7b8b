"""The benchmark scripts run (at their smallest size) and their built-in checks hold: a broken benchmark is found
here, not on the one GPU run a session gets."""

from __future__ import annotations

import json
import os
import runpy
import sys

import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


@pytest.fixture
def run(monkeypatch, capsys):
    """Runs a benchmark script in this process (its imports already loaded) and returns its `RESULT {json}` lines."""
    monkeypatch.syspath_prepend(BENCHMARKS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU sizes, on any machine

    def run_script(script: str, *args: str) -> list[dict]:
        monkeypatch.setattr(sys, "argv", [script, *args])
        runpy.run_path(os.path.join(BENCHMARKS, script), run_name="__main__")
        out = capsys.readouterr().out
        return [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]

    return run_script


def test_bench_forward_runs_every_variant_and_each_mode_matches_lycoris(run):
    (result,) = run("bench_forward.py", "--model", "flux", "--steps", "1", "--reps", "1")
    assert set(result["variants"]) == {"plain", "lycoris", "lycoris_bypass", "low_memory", "fold", "auto"}
    assert all(v["s_per_step"] > 0 for v in result["variants"].values())
    assert result["variants"]["low_memory"]["resolved_mode"] == "low_memory"
    differences = {name: v["rel_diff_vs_lycoris"] for name, v in result["variants"].items()}
    assert all(differences[name] <= 2e-5 for name in ("low_memory", "fold", "auto")), differences  # fp32 on CPU


def test_bench_host_overhead_times_every_variant(run):
    (result,) = run("bench_host_overhead.py", "--reps", "1", "--loops", "1")
    assert set(result["us_per_layer_call"]) == {"plain", "lycoris", "lycoris_bypass", "low_memory", "fold"}
    assert set(result["us_mask_update_per_call"]) == {"lycoris", "lycoris_bypass", "low_memory", "fold"}
    assert result["us_fold_write_check_per_call"] > 0
    assert set(result["us_hook_per_call"]) == set(result["us_mask_update_per_call"])


def test_bench_host_overhead_times_two_adapters(run):
    (result,) = run("bench_host_overhead.py", "--reps", "1", "--loops", "1", "--adapters", "2")
    assert result["adapters"] == 2 and set(result["us_per_layer_call"]) == {"plain", "lycoris", "low_memory", "fold"}
    assert set(result["us_hook_per_call"]) == {"lycoris", "low_memory", "fold"}


def test_cost_model_counts_each_layer_once(run):
    sdxl, flux = run("cost_model.py")
    assert sdxl["tlora_layers"] == 700, "SDXL's Attention + FeedForward linears, as the issue's anchor counts them"
    assert 0 < sdxl["bypass_extra_flop_share"] < 1 and 0 < flux["fold_extra_flop_share"] < 1


def test_bench_load_times_the_cached_load_and_its_hit_equals_the_rebuild(run):
    (result,) = run("bench_load.py", "--size", "tiny", "--reps", "1", "--rank", "8", "--lycoris-modules", "2")
    assert (result["size"], result["rank"]) == ("tiny", 8)  # the options bench_create shares
    assert result["cache_hit_bit_identical"] is True
    assert result["load_tlora_cache_cold_s"] > 0 and result["load_tlora_cache_hit_s"] > 0
    assert result["cache_key_weight_checksums_s"] > 0 and result["cache_file_mib"] > 0


def test_bench_startup_times_fresh_processes(run):
    (result,) = run("bench_startup.py", "--reps", "1", "--cases", "help")
    assert list(result["median_seconds"]) == ["tlora-hooks --help"]
    assert result["median_seconds"]["tlora-hooks --help"] > 0


def test_bench_train_times_every_variant_and_its_gradients_equal_the_lycoris_loop(run):
    (result,) = run("bench_train.py", "--size", "tiny", "--reps", "1", "--rank", "8")
    assert set(result["s_per_step"]) == {"tlora_hooks", "lycoris_loop", "peft_lora"}
    assert all(seconds > 0 for seconds in result["s_per_step"].values())
    assert all(size > 0 for size in result["saved_for_backward_mib"].values())
    assert result["mode"] == "fold" and result["rel_grad_diff_vs_lycoris_loop"] <= 1e-4  # fp32 on CPU


def test_bench_create_builds_what_lycoris_builds(run):
    (result,) = run("bench_create.py", "--size", "tiny", "--reps", "1", "--rank", "8", "--lycoris-modules", "2")
    assert (result["size"], result["rank"]) == ("tiny", 8)  # the options bench_load shares
    assert result["lycoris_modules_timed"] == 2 and result["modules"] > 2
    assert result["create_tlora_s"] > 0 and result["lycoris_s"] > 0 and result["lycoris_no_gc_s"] > 0
    assert result["max_rel_product_difference"] < 1e-4 and result["max_rel_lambda_difference"] < 1e-5
