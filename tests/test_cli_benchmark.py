"""Smoke test of scripts/benchmark_moe.py --quick (no timing assertions: speed is read from its
output, see docs/performance.md)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "benchmark_moe.py")
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import benchmark_moe  # noqa: E402


def test_quick_run_reports_every_column(tmp_path):
    out = tmp_path / "bench.json"
    # --quick with smaller sizes still, to keep the suite fast.
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--dim", "32", "--hidden", "64", "--tokens", "256",
         "--reps", "2", "--threads", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio" in proc.stdout and "moe-32" in proc.stdout and "moe-64-h" in proc.stdout
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {(r["config"], r["dtype"]) for r in rows} == {
        ("moe-32", "fp32"), ("moe-64-h", "fp32"), ("moe-32", "bf16"), ("moe-64-h", "bf16")}
    for r in rows:
        assert r["tokens"] == 256 and r["device"] == "cpu" and r["threads"] == 1
        assert r["dense_ms"] > 0 and r["moe_ms"] > 0 and r["ratio"] > 0
        assert abs(r["ratio"] - r["moe_ms"] / r["dense_ms"]) < 1e-6 and r["pair_ratio"] > 0
        assert len(r["moe_all_ms"]) == len(r["dense_all_ms"]) == 2
        assert r["moe_act_mib"] > 0 and r["dense_act_mib"] > 0
        assert r["weight_floor"] > 0 and r["max_over_mean"] >= 1
        # Paper counting: 3 × 2 × k × (d·h + h·d) FLOPs per token for both layers.
        flops = 3 * 2 * 4 * (32 * 64 * 2) * 256
        assert abs(r["moe_gflops"] - flops / (r["moe_ms"] / 1e3) / 1e9) < 1e-6 * r["moe_gflops"]
    assert result["machine"]["threads"] == 1 and result["bandwidth_GBps"]["cpu"] > 0


def test_configs_parse_like_the_paper():
    flat = benchmark_moe.parse_config("MoE-256", k=4, groups=16)
    assert (flat.num_experts, flat.hierarchical, flat.k) == (256, False, 4)
    hier = benchmark_moe.parse_config("moe-1024-h", k=4, groups=16)
    assert (hier.num_experts, hier.hierarchical, hier.num_groups, hier.k) == (1024, True, 16, 4)
    moe, dense = benchmark_moe.build_layers(benchmark_moe.parse_config("moe-64-h", 4, 4), 16, 8,
                                            "noisy_top_k", False)
    assert moe.num_groups == 4 and moe.experts_per_group == 16
    assert dense[0].out_features == 4 * 8  # MoE-1-Wide: as wide as the k active experts


@pytest.mark.parametrize("bad", ["moe-x", "moe-2", "moe-24-h"])
def test_bad_configs_name_the_fix(bad):
    with pytest.raises(SystemExit, match="moe-|k=|groups"):
        benchmark_moe.parse_config(bad, k=4, groups=16)
