"""Expert backends (fairseq_smoe/ops): ``grouped_mm`` and ``triton`` equal the ``loop`` backend and
the dense reference (outputs, balance statistics, every gradient), and their device-resident
training step reads nothing back to the host and issues as many operators for 8 experts as for
32, for 16 tokens as for 48.

Everything runs on CPU: ``triton`` under the Triton interpreter (tiny shapes: it is slow),
``grouped_mm`` through torch's CPU ``_grouped_mm``. The ``gpu`` marker runs the same tests on CUDA
(deselected here by pyproject's addopts; ``scripts/gpu_check.sh`` runs them with
``TRITON_INTERPRET=0``).
"""

import os

# Before triton is imported anywhere (it reads this when a kernel is defined). Only
# fairseq_smoe.ops.triton_experts imports triton, and only CPU tensors reach it here.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from moe_reference import dense_hierarchical_moe, dense_moe, randomise_gates  # noqa: E402

from fairseq_smoe import ops  # noqa: E402
from fairseq_smoe.modules import HierarchicalMoELayer, MoELayer  # noqa: E402
from fairseq_smoe.ops import grouped_mm as grouped_mm_module  # noqa: E402
from fairseq_smoe.ops.counting import count_step  # noqa: E402

BACKENDS = ["grouped_mm", "triton"]
GATINGS = ["noisy_top_k", "top_k", "softmax", "batchwise"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
FP32 = dict(atol=1e-5, rtol=1e-5)


def build(kind, gating, backend, device="cpu", dtype=torch.float32, recompute=False, **sizes):
    """Sizes are multiples of 8: _grouped_mm's 16-byte rows in bf16 (secondary gate products in
    fp32: b = 4 columns)."""
    torch.manual_seed(0)
    if kind == "flat":
        layer = MoELayer(8, 8, sizes.get("num_experts", 6), hidden_dim=16, k=2, gating=gating,
                         num_hidden_layers=sizes.get("layers", 1), w_importance=0.3, w_load=0.2,
                         recompute_activations=recompute, backend=backend)
    else:
        layer = HierarchicalMoELayer(8, 8, num_groups=sizes.get("groups", 3), experts_per_group=4,
                                     hidden_dim=16, gating=gating, w_importance=0.3, w_load=0.2,
                                     recompute_activations=recompute, backend=backend)
    return randomise_gates(layer).to(device=device, dtype=dtype).train()


def pair(kind, gating, backend, **kw):
    """(loop layer, the same parameters on ``backend``)."""
    loop = build(kind, gating, "loop", **kw)
    other = build(kind, gating, backend, **kw)
    other.load_state_dict(loop.state_dict())
    return loop, other


def padding_for(shape, device="cpu"):
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    mask[0, -2:] = True
    mask[-1, -1:] = True
    return mask


def step(layer, x, mask, seed=11):
    """Outputs, stats and the gradients of one objective w.r.t. x and every parameter."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y, stats = layer(x, mask)
    target = torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape).to(y.dtype)
    ((y * target).sum() + stats.loss).backward()
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in layer.named_parameters()})
    return y.detach(), stats, grads


def assert_steps_equal(a, b, tol):
    (y_a, stats_a, grads_a), (y_b, stats_b, grads_b) = a, b
    torch.testing.assert_close(y_a.float(), y_b.float(), **tol)
    for name in ("loss", "importance", "load"):
        torch.testing.assert_close(getattr(stats_a, name).float(), getattr(stats_b, name).float(),
                                   **tol, msg=name)
    assert torch.equal(stats_a.counts, stats_b.counts)
    assert int(stats_a.num_tokens) == int(stats_b.num_tokens)
    assert int(stats_a.unrouted) == int(stats_b.unrouted)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        g_a, g_b = grads_a[name], grads_b[name]
        if g_a is None or g_b is None:
            assert g_a is None and g_b is None, name
            continue
        torch.testing.assert_close(g_a.float(), g_b.float(), **tol, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gating", GATINGS)
@pytest.mark.parametrize("kind", ["flat", "hierarchical"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_equals_loop(backend, kind, gating, device):
    loop, other = pair(kind, gating, backend, device=device)
    x = torch.randn(3, 7, 8, device=device)
    mask = padding_for((3, 7), device)
    assert_steps_equal(step(other, x, mask), step(loop, x, mask), FP32)
    if gating == "noisy_top_k":  # and eval (no noise), without padding
        loop.eval(), other.eval()
        assert_steps_equal(step(other, x, None), step(loop, x, None), FP32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["flat", "hierarchical"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_equals_dense_reference(backend, kind, device):
    layer = build(kind, "noisy_top_k", backend, device=device)
    reference = dense_moe if kind == "flat" else dense_hierarchical_moe
    x = torch.randn(3, 7, 8, device=device, requires_grad=True)
    mask = padding_for((3, 7), device)
    torch.manual_seed(3)
    y, stats = layer(x, mask)
    torch.manual_seed(3)
    y_ref, loss_ref, importance_ref, load_ref = reference(layer, x, mask)
    torch.testing.assert_close(y, y_ref, **FP32)
    torch.testing.assert_close(stats.loss, loss_ref.float(), **FP32)
    torch.testing.assert_close(stats.importance, importance_ref.reshape(stats.importance.shape), **FP32)
    torch.testing.assert_close(stats.load, load_ref.reshape(stats.load.shape).float(), atol=1e-4, rtol=1e-5)
    params = [x, *layer.parameters()]
    grads = torch.autograd.grad((y * y.detach()).sum() + stats.loss, params, allow_unused=True)
    grads_ref = torch.autograd.grad((y_ref * y.detach()).sum() + loss_ref, params, allow_unused=True)
    for g, g_ref in zip(grads, grads_ref):
        if g_ref is None:
            assert g is None or g.abs().max() == 0
        else:
            torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["flat", "hierarchical"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_backends_equal_loop(backend, kind, dtype, device):
    """Same dtype, loose tolerance (the loop rounds per expert product, the kernels per tile)."""
    loop, other = pair(kind, "noisy_top_k", backend, device=device, dtype=dtype)
    x = torch.randn(3, 7, 8, device=device, dtype=dtype)
    mask = padding_for((3, 7), device)
    assert_steps_equal(step(other, x, mask), step(loop, x, mask), dict(atol=6e-2, rtol=5e-2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_deep_experts_recompute_and_empty_experts(backend, device):
    """Two hidden layers with recomputation (App. D), and 12 experts for 3 tokens (at least 6 get
    no rows: their gradients are exactly 0, as the loop's)."""
    loop, other = pair("flat", "top_k", backend, device=device, recompute=True, num_experts=12,
                       layers=2)
    x = torch.randn(1, 3, 8, device=device)
    ours, theirs = step(other, x, None), step(loop, x, None)
    assert_steps_equal(ours, theirs, FP32)
    unused = ours[1].counts == 0
    assert unused.sum() >= 6
    for name, grad in ours[2].items():
        if name.startswith("experts."):
            assert grad[unused].abs().max() == 0, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_more_than_1024_experts(backend, device, monkeypatch):
    """1030 experts, some tokens sent past expert 1024: _grouped_mm gets fewer than 1024 groups
    per call (the experts in two chunks of 515), results equal the loop's."""
    calls = []
    original = torch._grouped_mm

    def watched(a, b, *args, **kwargs):
        calls.append(b.shape[0])
        return original(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", watched)
    loop, other = pair("flat", "top_k", backend, device=device, num_experts=1030)
    with torch.no_grad():
        for layer in (loop, other):
            layer.gate.w_gate.mul_(0.1)
            layer.gate.w_gate[0, 1027] = 20.0  # x[0] > 0: expert 1027 (the second chunk)
            layer.gate.w_gate[1, 5] = 20.0
    x = torch.randn(2, 8, 8, device=device)
    ours = step(other, x, None)
    assert_steps_equal(ours, step(loop, x, None), FP32)
    assert ours[1].counts[1024:].sum() > 0 and ours[1].counts[:1024].sum() > 0
    if backend == "grouped_mm":
        assert calls == [515, 515] * (len(calls) // 2) and calls
        assert max(calls) < grouped_mm_module.GROUP_LIMIT
    else:
        assert calls == []


@pytest.mark.parametrize("num_experts", [1023, 1024, 1025, 2046, 2047, 4096])
def test_grouped_mm_calls_stay_under_cutlass_group_limit(num_experts, monkeypatch):
    """The bf16 route: whatever the device, no ``_grouped_mm`` call gets 1024 groups or more
    (CUTLASS's grouped GEMM refuses them); the chunks cover every expert once, in order."""
    from fairseq_smoe.ops.grouped_mm import GROUP_LIMIT, chunk_bounds, chunked_grouped_mm

    bounds = chunk_bounds(num_experts)
    assert bounds[0][0] == 0 and bounds[-1][1] == num_experts
    assert all(end == nxt for (_, end), (nxt, _) in zip(bounds, bounds[1:]))
    assert max(end - first for first, end in bounds) < GROUP_LIMIT
    calls = []

    def watched(a, b, offs):
        calls.append(b.shape[0])
        return torch.zeros(a.shape[0], b.shape[2], dtype=a.dtype)

    monkeypatch.setattr(grouped_mm_module, "_grouped_mm", watched)
    x = torch.randn(16, 8, dtype=torch.bfloat16)
    w = torch.zeros(num_experts, 8, 8, dtype=torch.bfloat16)
    offs = torch.full((num_experts,), 16, dtype=torch.int32)
    chunked_grouped_mm(x, w, offs, torch.ones(16, dtype=torch.bool))
    assert calls and max(calls) < GROUP_LIMIT and sum(calls) == num_experts


def _resident_step(layer, x, mask, dry_run=False):
    """Counts of one training step. ``dry_run``: Triton launches are counted, not run (what a
    resident step issues never depends on the values; checked below)."""
    if dry_run and layer.backend == "triton" and x.device.type == "cpu":
        from fairseq_smoe.ops import triton_experts

        triton_experts.DRY_RUN[0] = True
    try:
        with count_step() as counts:
            y, stats = layer(x, mask)
            (y.square().sum() + stats.loss).backward()
    finally:
        if dry_run and layer.backend == "triton" and x.device.type == "cpu":
            triton_experts.DRY_RUN[0] = False
    return counts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padded", [True, False], ids=["mask", "no_mask"])
@pytest.mark.parametrize("gating", GATINGS)
@pytest.mark.parametrize("kind", ["flat", "hierarchical"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_reads_nothing_back(backend, kind, gating, padded, device):
    """No Tensor.tolist/item/__int__/__bool__, no nonzero/bincount/_local_scalar_dense, and no
    tensor made from Python data (a host-to-device copy on CUDA) in forward + backward, for
    every gating (batchwise included: its shapes come from the number of rows alone), with and
    without a padding mask."""
    layer = build(kind, gating, backend, device=device)
    x = torch.randn(3, 7, 8, device=device, requires_grad=True)
    mask = padding_for((3, 7), device) if padded else None
    _resident_step(layer, x, mask)  # first call: lazy imports, kernel compilation
    counts = _resident_step(layer, x, mask)
    assert counts.syncs == []
    loop = _resident_step(build(kind, gating, "loop", device=device), x, mask)
    assert "Tensor.tolist" in loop.host_reads  # the loop reads its counts: the counter sees reads
    assert loop.host_copies  # and copies them back (ops/loop.py): the counter sees copies


def test_counter_sees_host_copies_with_their_site():
    """The copies the GPU audit found: a Python value written through a tensor index, and
    ``torch.as_tensor``/``torch.tensor`` of Python data; a fill with a Python scalar is none."""
    index = torch.tensor([1, 2])
    with count_step() as counts:
        flags = torch.zeros(4, dtype=torch.bool)
        flags[index] = True
        torch.as_tensor(5)
        torch.tensor([1, 2])
        torch.full((), 5) + 1
    assert len(counts.host_copies) == 3, counts.host_copies
    assert all("test_module_backends.py:" in site for site in counts.host_copies)
    assert counts.host_reads == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gating", ["noisy_top_k", "top_k", "softmax"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_operator_count_is_flat_in_experts_and_tokens(backend, gating, device):
    def kernels(num_experts, tokens, dry_run=True):
        layer = build("flat", gating, backend, device=device, num_experts=num_experts)
        x = torch.randn(tokens // 8, 8, 8, device=device, requires_grad=True)
        mask = padding_for((tokens // 8, 8), device)
        _resident_step(layer, x, mask, dry_run)
        layer.zero_grad(set_to_none=True)
        return _resident_step(layer, x, mask, dry_run).kernels

    base = kernels(8, 16)
    assert kernels(8, 16, dry_run=False) == base
    assert kernels(32, 16) == base
    assert kernels(8, 48) == base
    if backend == "triton":
        assert 0 < _resident_step(build("flat", gating, backend, device=device),
                                  torch.randn(2, 8, device=device), None).launches <= 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_operator_count_from_16_to_1024_experts(backend):
    """A training step issues as many operators for 1024 experts as for 16 on ``triton``; on
    ``grouped_mm`` too up to 1023, and from 1024 on a constant more for the second chunk of
    experts (CUTLASS takes fewer than 1024 groups a call), however many tokens."""
    def kernels(num_experts, tokens=32):
        layer = build("flat", "top_k", backend, num_experts=num_experts)
        x = torch.randn(tokens // 8, 8, 8, requires_grad=True)
        _resident_step(layer, x, None, dry_run=True)
        layer.zero_grad(set_to_none=True)
        return _resident_step(layer, x, None, dry_run=True).kernels

    base = kernels(16)
    if backend == "triton":
        assert kernels(1024) == base == kernels(1024, tokens=64)
    else:
        assert kernels(1023) == base
        assert kernels(1024) == kernels(2046) == kernels(1024, tokens=64) > base


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gating", ["noisy_top_k", "top_k", "softmax", "batchwise"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_hierarchical_operator_count_is_flat_in_tokens_and_groups(backend, gating, device):
    """The secondary gates' weights are stacked by group (secondary_gates.py): their products,
    routing, loads and L_batchwise are one pass for all groups, so a step issues the same
    operators for 4 or 8 groups, 16 or 48 tokens."""
    def kernels(groups, tokens):
        layer = build("hierarchical", gating, backend, device=device, groups=groups)
        x = torch.randn(tokens // 8, 8, 8, device=device, requires_grad=True)
        mask = padding_for((tokens // 8, 8), device)
        _resident_step(layer, x, mask, dry_run=True)
        layer.zero_grad(set_to_none=True)
        return _resident_step(layer, x, mask, dry_run=True).kernels

    base = kernels(4, 16)
    assert kernels(4, 48) == base
    assert kernels(8, 16) == base


def test_backend_choice_and_errors(monkeypatch):
    cpu = torch.device("cpu")
    assert ops.resolve("auto", cpu, torch.bfloat16) == "loop"
    assert ops.resolve("auto", cpu, torch.float32) == "loop"
    for name in ("loop", "grouped_mm", "triton"):
        assert ops.resolve(name, cpu, torch.float32) == name
        assert MoELayer(8, 8, 4, 16, k=2, backend=name).experts_backend(torch.zeros(1)).name == name
    assert not grouped_mm_module.fast_on(cpu, torch.bfloat16, [8, 16])
    with pytest.raises(ValueError, match="backend must be one of"):
        MoELayer(8, 8, 4, 16, backend="fast")
    monkeypatch.setenv("SMOE_EXPERTS_BACKEND", "triton")
    assert MoELayer(8, 8, 4, 16, k=2).backend == "triton"
    assert MoELayer(8, 8, 4, 16, k=2, backend="loop").backend == "loop"
    monkeypatch.setenv("SMOE_EXPERTS_BACKEND", "gpu")
    with pytest.raises(ValueError, match="SMOE_EXPERTS_BACKEND must be one of"):
        MoELayer(8, 8, 4, 16)
    monkeypatch.delenv("SMOE_EXPERTS_BACKEND")
    layer = MoELayer(8, 8, 4, 12, k=2, backend="grouped_mm").to(torch.bfloat16)  # 12: unaligned
    with pytest.raises(ValueError, match="multiples of 8"):
        layer(torch.randn(3, 8, dtype=torch.bfloat16))
    monkeypatch.delattr(torch, "_grouped_mm")
    with pytest.raises(RuntimeError, match="needs torch._grouped_mm"):
        MoELayer(8, 8, 4, 16, k=2, backend="grouped_mm")(torch.randn(3, 8))


def test_grouped_mm_auto_only_on_compute_capability_9(monkeypatch):
    """auto: grouped_mm only for bf16 on sm90-sm9x, triton elsewhere on CUDA (sm80, sm100, sm120)."""
    cuda = torch.device("cuda", 0)
    for capability, dtype, expected in [((9, 0), torch.bfloat16, "grouped_mm"),
                                        ((9, 0), torch.float16, "triton"),
                                        ((9, 0), torch.float32, "triton"),
                                        ((8, 0), torch.bfloat16, "triton"),
                                        ((10, 0), torch.bfloat16, "triton"),
                                        ((12, 0), torch.bfloat16, "triton")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert ops.resolve("auto", cuda, dtype, [512, 1024]) == expected, (capability, dtype)
    monkeypatch.setattr(ops, "triton_available", lambda: False)
    assert ops.resolve("auto", cuda, torch.float32) == "loop"


def test_model_option_reaches_the_layer():
    import argparse

    from fairseq_smoe.moe_args import add_moe_args, build_moe_layer, set_moe_defaults

    parser = argparse.ArgumentParser()
    add_moe_args(parser)
    for flags, expected in [(["--moe-experts-backend", "triton"], "triton"), ([], "auto"),
                            (["--moe-experts-backend", "grouped_mm", "--moe-groups", "2"],
                             "grouped_mm")]:
        args = parser.parse_args(["--moe-num-experts", "4", "--moe-k", "2", *flags])
        set_moe_defaults(args)
        assert build_moe_layer(args, 8).backend == expected
    with pytest.raises(SystemExit):
        parser.parse_args(["--moe-experts-backend", "cuda"])


def test_benchmark_reports_the_launch_and_sync_proxy(tmp_path):
    """scripts/benchmark_moe.py's proxy columns: the loop reads its counts back (and more
    operators for more experts), the resident backends read nothing; triton launches kernels."""
    import json
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "scripts"))
    import benchmark_moe

    out = tmp_path / "bench.json"
    benchmark_moe.main(["--configs", "moe-8,moe-32,moe-16-h", "--groups", "4", "--tokens", "64",
                        "--dim", "16", "--hidden", "16", "--reps", "1", "--warmup", "0",
                        "--dtypes", "fp32", "--devices", "cpu", "--threads", "1", "--no-memory",
                        "--json", str(out)])
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    for row in rows.values():
        proxy = row["proxy"]
        assert row["backend"] == "loop"
        assert proxy["loop"]["host_reads"] >= 2 and "Tensor.tolist" in proxy["loop"]["reads"]
        assert proxy["grouped_mm"]["host_reads"] == proxy["triton"]["host_reads"] == 0
        assert proxy["triton"]["triton_launches"] > 0 and proxy["grouped_mm"]["triton_launches"] == 0
        assert proxy["triton"]["kernels"] == proxy["triton"]["aten_ops"] + proxy["triton"]["triton_launches"]
    assert rows["moe-32"]["proxy"]["loop"]["kernels"] > rows["moe-8"]["proxy"]["loop"]["kernels"]
    for backend in BACKENDS:
        assert rows["moe-32"]["proxy"][backend]["kernels"] == rows["moe-8"]["proxy"][backend]["kernels"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_language_model_forward_adds_no_host_reads(backend):
    """The LM decoder (LSTM -> MoE -> LSTM) on a padded batch: a training step of the model reads
    nothing back on a device-resident backend (no padding_mask.any() of its own)."""
    from test_module_lm_model import build_decoder

    decoder = build_decoder(moe_experts_backend=backend, moe_hidden_dim=16)
    assert decoder.moe.moe.backend == backend
    decoder.train()
    tokens = torch.randint(4, 50, (3, 6))
    tokens[0, -2:] = decoder.padding_idx
    decoder(tokens)[0].float().square().mean().backward()  # warm-up
    with count_step() as counts:
        out, extra = decoder(tokens)
        out.float().square().mean().backward()
    assert counts.host_reads == []
    loop = build_decoder(moe_experts_backend="loop", moe_hidden_dim=16)
    with count_step() as counts:
        loop(tokens)[0].float().square().mean().backward()
    assert counts.host_reads  # the counter sees the loop's count read


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["flat", "hierarchical"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_the_experts_in_half_precision(backend, kind, device, monkeypatch):
    """Under autocast (``--amp``) fp32 master weights: the experts' products run in autocast's
    dtype (bf16 here), as autocast runs a Linear, and their gradients reach the weights in fp32;
    the outputs are the fp32 step's to bf16 accuracy."""
    products = []
    original = torch._grouped_mm

    def watched(a, b, *args, **kwargs):
        products.append((a.dtype, b.dtype))
        return original(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", watched)
    if backend == "triton":
        from fairseq_smoe.ops import triton_experts

        original_linear = triton_experts.grouped_linear

        def watched_linear(x, w, *args, **kwargs):
            products.append((x.dtype, w.dtype))
            return original_linear(x, w, *args, **kwargs)

        monkeypatch.setattr(triton_experts, "grouped_linear", watched_linear)
    layer = build(kind, "top_k", backend, device=device)
    x = torch.randn(3, 7, 8, device=device)
    mask = padding_for((3, 7), device)
    full = step(layer, x, mask)
    products.clear()
    with torch.autocast(device, dtype=torch.bfloat16):
        half = step(layer, x, mask)
    assert (torch.bfloat16, torch.bfloat16) in products
    assert all(p.grad.dtype == torch.float32 for p in layer.parameters() if p.grad is not None)
    assert_steps_equal(half, full, dict(atol=5e-2, rtol=5e-2))
