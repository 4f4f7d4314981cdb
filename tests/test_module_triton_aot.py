"""The triton backend's kernels compiled ahead of time for sm_80 and sm_90, without a GPU, and the
host's choices of tiles and dot precision.

``scripts/triton_aot_report.py`` runs in a subprocess (it needs compiled kernels, not the
interpreted ones the rest of the suite runs): it records every launch the host code would make on
a GPU of each compute capability, dtype and fp32 precision, compiles each distinct kernel with
``triton.compile`` for a stand-in ``GPUTarget``, and reports ptxas's registers and spills and
Triton's shared memory (``pytest -s`` shows the table). Every build must succeed, and none may
spill at the configurations the host chooses.
"""

import importlib.util
import json
import os
import subprocess
import sys

# Before triton is imported anywhere (see tests/test_module_backends.py).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fairseq_smoe import ops  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "triton_aot_report.py")
SKIPPED = 77  # the script's exit status when triton or its ptxas is missing
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed")


@needs_triton
def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    rows_path = tmp_path / "rows.json"
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("TRITON_INTERPRET", None)  # the script compiles; it sets TRITON_INTERPRET=0 itself
    result = subprocess.run([sys.executable, SCRIPT, "--arch", "80,90", "--json", str(rows_path)],
                            capture_output=True, text=True, env=env, timeout=600)
    if result.returncode == SKIPPED:
        pytest.skip(result.stdout.strip() or result.stderr.strip())
    print(result.stdout)
    assert result.returncode in (0, 1), result.stdout + result.stderr
    rows = json.loads(rows_path.read_text())
    failed = [r for r in rows if r["error"] or r["registers"] is None]
    assert not failed, failed
    builds = {(r["arch"], r["kernel"], r["dtype"], r["precision"]) for r in rows}
    for arch in ("sm_80", "sm_90"):
        for kernel in ("grouped_linear", "grouped_wgrad"):
            for dtype, precision in [("float32", "ieee"), ("float32", "tf32"), ("float16", "-"),
                                     ("bfloat16", "-")]:
                assert (arch, kernel, dtype, precision) in builds, (arch, kernel, dtype, precision)
    variants = {r["variant"] for r in rows}
    assert {"bias, relu", "bias", "no bias", "input grad (Wᵀ)", "weight grad"} <= variants
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, spilled
    assert result.returncode == 0, result.stdout


def test_tiles_follow_dtype_precision_and_compute_capability():
    if not ops.triton_available():
        pytest.skip("triton is not installed")
    from fairseq_smoe.ops import triton_experts as te

    assert te.kernel_config(torch.float32, None, "ieee") == te.INTERPRETER_CONFIG
    for capability in [(8, 0), (8, 6), (8, 9)]:
        assert te.kernel_config(torch.float32, capability, "ieee") == te.FP32_IEEE_SM8X_CONFIG
        assert te.kernel_config(torch.float32, capability, "tf32") == te.DEFAULT_CONFIG
        assert te.kernel_config(torch.bfloat16, capability, "tf32") == te.DEFAULT_CONFIG
    for capability in [(9, 0), (10, 0), (12, 0)]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert te.kernel_config(dtype, capability, "ieee") == te.DEFAULT_CONFIG


@pytest.fixture
def matmul_precision():
    """Restores PyTorch's fp32 matmul setting (through the API that sets both the legacy flag and
    torch >= 2.9's fp32_precision, so that neither is left inconsistent for later tests)."""
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def test_fp32_dot_precision_follows_pytorch_tf32_setting(matmul_precision, monkeypatch):
    if not ops.triton_available():
        pytest.skip("triton is not installed")
    from fairseq_smoe.ops import triton_experts as te

    torch.set_float32_matmul_precision("highest")
    assert te.fp32_matmul_precision() == "ieee"
    torch.set_float32_matmul_precision("high")
    assert te.fp32_matmul_precision() == "tf32"
    # Under the interpreter (CPU tensors) the products stay IEEE whatever the CUDA setting;
    # compiled for a GPU, fp32 follows it and half precision is unaffected.
    assert te._dot_precision(torch.float32) == "ieee"
    monkeypatch.setattr(te, "INTERPRET", False)
    assert te._dot_precision(torch.float32) == "tf32"
    assert te._dot_precision(torch.bfloat16) == "tf32"
    torch.set_float32_matmul_precision("highest")
    assert te._dot_precision(torch.float32) == "ieee"


def test_launches_carry_the_chosen_tiles_and_precision():
    """What the host passes to the kernels for a GPU of each capability (recorded, not run)."""
    if not ops.triton_available():
        pytest.skip("triton is not installed")
    from fairseq_smoe.ops import triton_experts as te
    from fairseq_smoe.ops.resident import group

    grouping = group(torch.randint(0, 3, (20,)), 3)
    x = torch.randn(20, 32, requires_grad=True)
    w = torch.randn(3, 32, 48, requires_grad=True)
    for capability, precision, expected in [((8, 0), "ieee", te.FP32_IEEE_SM8X_CONFIG),
                                            ((8, 0), "tf32", te.DEFAULT_CONFIG),
                                            ((9, 0), "ieee", te.DEFAULT_CONFIG)]:
        capture = te.Capture(capability, precision, [])
        te.CAPTURE[0] = capture
        try:
            te.TritonBackend().linear(x, grouping, w, None, True).sum().backward()
        finally:
            te.CAPTURE[0] = None
        kernels = [kernel.__name__ for kernel, *_ in capture.launches]
        assert kernels == ["_grouped_linear_kernel", "_grouped_linear_kernel", "_grouped_wgrad_kernel"]
        for _, _, meta, config in capture.launches:
            assert config == expected
            assert meta["PRECISION"] == precision
            assert (meta["BM"], meta["BN"], meta["BK"]) == (expected.BM, expected.BN, expected.BK)
