"""The op microbenchmark script (bench/ops.py) on one tiny CPU shape: its records, criteria and files."""

from __future__ import annotations

import json
import re

import torch

from bench import environment, op_cases, ops, ops_criteria, timing

TINY = op_cases.Shape("tiny", T=2, B=3, C=4, D=5)
CASES = {case.name: case for case in op_cases.CASES}
FAST = timing.TimingConfig(warmup_s=0.0, sample_s=0.0, min_samples=3, max_samples=3, budget_s=0.0)


def test_ops_benchmark_report_structure(tmp_path):
    report = ops.run("cpu", (TINY,), FAST, threads=torch.get_num_threads())
    json_path, png_path = ops.write(report, tmp_path)
    assert json_path.name == "ops-cpu.json" and png_path.is_file() and png_path.stat().st_size > 0
    loaded = json.loads(json_path.read_text())
    for key in ("device", "date_utc", "versions", "threads", "timer", "backends", "shapes", "records", "criteria"):
        assert key in loaded, key
    assert loaded["device"]["type"] == "cpu" and loaded["threads"] >= 1
    assert {"torch", "triton", "python", "noprop_commit"} <= set(loaded["versions"])
    # Triton on the CPU is the interpreter (tests set TRITON_INTERPRET=1): never timed
    assert loaded["backends"]["reference"] == "timed" and loaded["backends"]["triton"].startswith("skipped")

    timed = [b for b, status in loaded["backends"].items() if status == "timed"]
    expected = {
        (case.name, pass_, backend)
        for case, pass_ in op_cases.CASE_PASSES
        for backend in timed
        if not op_cases.lacks(backend, case)  # e.g. the extension's stacked_linear: declared missing
    }
    assert {(r["case"], r["pass"], r["backend"]) for r in loaded["records"]} == expected
    for r in loaded["records"]:
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["samples"] == 3
        assert r["bytes"] == CASES[r["case"]].bytes_moved(TINY, r["pass"])
        assert (r["speedup"] is None) == (r["backend"] == "reference")
        assert r["floor_ms"] is None and r["peak_mem_bytes"] is None  # CUDA-only columns

    # the CPU criteria need the D=784 shape, which this run skipped: reported, not evaluated
    assert [c["passed"] for c in loaded["criteria"]] == [None, None]
    assert all(c["threshold"] == ops_criteria.CPU_SPEEDUP_MIN for c in loaded["criteria"])
    table = ops.markdown_table(report).splitlines()
    assert len(table) == 2 + len(op_cases.CASE_PASSES)


def test_byte_counts_follow_the_shape():
    """eps is never counted: noised_latents fwd moves W, y, a, b, seed and writes z only."""
    s = op_cases.Shape("s", T=10, B=128, C=10, D=784)
    W, ab, z = 10 * 784, 2 * 10 * 128, 10 * 128 * 784
    assert CASES["noised_latents"].bytes_moved(s, "fwd") == 4 * (W + ab + z) + 8 * (128 + 1)
    assert CASES["normal"].bytes_moved(s, "fwd") == 4 * 10 * 128 * 784 + 8


def test_device_tag():
    assert environment.device_tag(torch.device("cpu"), "Intel Xeon") == "cpu"
    assert environment.device_tag(torch.device("cuda"), "NVIDIA H100 80GB HBM3") == "h100"
    assert environment.device_tag(torch.device("cuda"), "NVIDIA GeForce RTX 4090") == "rtx4090"


def test_cpu_criterion_sums_forward_and_backward():
    shape = op_cases.shapes_named([op_cases.CPU_CRITERION_SHAPE])[0]
    records = [
        {"case": case.name, "pass": pass_, "shape": shape.name, "backend": backend, "median_ms": ms}
        for case, pass_ in op_cases.CASE_PASSES
        for backend, ms in (("reference", 4.0), ("extension", 2.0 if case.name == "noised_latents" else 0.5))
    ]
    dt, fm = ops_criteria.cpu_criteria(records, {})
    assert dt["measured"] == fm["measured"] == 16.0 / 5.0 and dt["passed"] and fm["passed"]


def test_end_to_end_benchmark_runs_and_reports(tmp_path, monkeypatch):
    """A tiny run of ``noprop bench`` on the CPU: the results file (in the current directory, the
    default ``--out``) and its criteria are complete, and it records the checkout's commit."""
    from noprop.cli import main

    monkeypatch.chdir(tmp_path)
    argv = ["bench", "--device", "cpu", "--width", "0.125", "--T", "2", "--steps", "1", "--warmup", "1",
            "--cases", "seed_style", "stack_eager", "--ode-steps", "2", "--inference-batch", "8", "--cpu-rounds", "1"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "train-cpu.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{40}", result["versions"]["noprop_commit"])
    assert result["versions"]["checkout"] == str(environment.REPO)
    assert set(result["training"]) == {"seed_style", "stack_eager"}
    for row in result["training"].values():
        assert row["epoch_seconds"] > 0 and row["peak_memory_mb"] > 0
    assert set(result["inference"]) == {"dt", "ct", "fm"}
    assert result["criteria"][0]["value"] is not None
    assert result["cpu_step"]["T"] == 2 and any("SGEMM" in c["criterion"] for c in result["criteria"])
    assert (tmp_path / "train-cpu.png").is_file()


def test_benchmarks_are_not_installed_and_need_a_checkout(tmp_path, monkeypatch, capsys):
    """setup.py installs noprop, noprop.models and noprop.kernels only; ``noprop bench`` outside a checkout says so."""
    from noprop import cli

    setup = (environment.REPO / "setup.py").read_text()
    assert "noprop.bench" not in setup and '"bench"' not in setup
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "noprop" / "cli.py"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "--device", "cpu"]) == 2
    assert "not installed" in capsys.readouterr().err


def test_an_export_without_git_is_recorded_as_not_a_checkout(monkeypatch):
    monkeypatch.setattr(environment, "_git", lambda *args: None)
    versions = environment.versions()
    assert versions["noprop_commit"] is None and versions["checkout"].startswith("not a git checkout")


def test_dt_step_flops_match_flop_counter_on_one_block():
    """The hand count of bench/cpu_step.py against FlopCounterMode on one (ungrouped) block's forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.cpu_step import dt_step_flops
    from noprop.blocks import BlockConfig, DTBlock

    config = BlockConfig.scaled(0.25)
    torch.manual_seed(0)
    block = DTBlock(10, 1, 28, 10, config)
    with FlopCounterMode(display=False) as counter:
        block(torch.randn(8, 1, 28, 28), torch.randn(8, 10)).sum().backward()
    assert dt_step_flops(1, 8, config) == counter.get_total_flops()
    assert dt_step_flops(10, 128) == 10 * 16 * dt_step_flops(1, 8)
    assert round(dt_step_flops(10, 128) / 1e9, 1) == 154.5  # the paper's block, T = 10, B = 128


def test_cpu_step_measurement_structure():
    from bench import cpu_step

    result = cpu_step.measure(T=2, batch_size=4, rounds=2, warmup=0, gemm_size=64, ops_T=(2, 4), width=0.125)
    assert len(result["step_seconds_all"]["default"]) == 2 and result["sgemm"]["gflop_per_second"] > 0
    assert result["speedup_vs_seed_style"] == result["step_seconds_median"]["seed_style"] / result["step_seconds_median"]["default"]
    assert result["host_memory"] == {"default": "reuse", "seed_style": "system", "default_system": "system", "seed_style_reuse": "reuse"}
    assert all(len(seconds) == 2 for seconds in result["step_seconds_all"].values())
    assert result["aten_ops_ratio"] > 1, "the seed-style loop dispatches more ops (5x at T = 10: tests/test_step.py)"
    labels = [label for label, *_ in cpu_step.criteria(result)]
    assert any("SGEMM" in label for label in labels) and any("seed-style" in label for label in labels)
