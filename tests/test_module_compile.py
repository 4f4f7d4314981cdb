"""``torch.compile(fullgraph=True)`` of a training step on the device-resident backends, on CPU.

A tiny flat and a tiny hierarchical layer, every gating mode, forward and backward through a
compiled function with ``backend="aot_eager"`` (dynamo and AOTAutograd trace the whole step,
forward and backward, into one graph each; no code generation), compared with the eager step:
outputs, balance statistics and every gradient. ``fullgraph=True`` makes any graph break an
error: a host read, an untraceable kernel launch, an ``out=`` write dynamo rejects.

``triton`` runs its kernels through the custom operators of ops/triton_experts.py (under the
Triton interpreter here), ``grouped_mm`` through torch's CPU ``_grouped_mm`` in bf16: torch's
fake ``_grouped_mm`` accepts bf16 only, as CUTLASS does, so an fp32 ``_grouped_mm`` cannot be
traced. The hierarchical layer's secondary gates project in fp32 (``grouped_matmul``), which on
CUDA and inside a compile goes to the triton operator.
"""

import os

# Before triton is imported anywhere (see tests/test_module_backends.py).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from moe_reference import randomise_gates  # noqa: E402

from fairseq_smoe import ops  # noqa: E402
from fairseq_smoe.modules import HierarchicalMoELayer, MoELayer  # noqa: E402

GATINGS = ["noisy_top_k", "top_k", "softmax", "batchwise"]
DTYPES = {"grouped_mm": torch.bfloat16, "triton": torch.float32}
TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}

needs_compile = pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile is missing")


def build(kind, gating, backend, dtype):
    torch.manual_seed(0)
    if kind == "flat":
        layer = MoELayer(8, 8, 6, hidden_dim=16, k=2, gating=gating, w_importance=0.3,
                         w_load=0.2, backend=backend)
    else:
        layer = HierarchicalMoELayer(8, 8, num_groups=3, experts_per_group=4, hidden_dim=16,
                                     gating=gating, w_importance=0.3, w_load=0.2, backend=backend)
    return randomise_gates(layer).to(dtype).train()


GRAPHS = []


def _recording_aot_eager(graph_module, example_inputs):
    """``backend="aot_eager"``, keeping the graphs dynamo hands it."""
    GRAPHS.append(graph_module)
    return torch._dynamo.backends.registry.lookup_backend("aot_eager")(graph_module, example_inputs)


def training_step(layer, x, mask, compiled: bool, seed=11):
    """Outputs, statistics and gradients of one step (compiled: forward and backward traced)."""
    def forward(x, mask):
        y, stats = layer(x, mask)
        target = torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape).to(y.dtype)
        objective = (y * target).sum() + stats.loss
        return objective, y, stats.loss, stats.importance, stats.load, stats.counts

    run = torch.compile(forward, fullgraph=True, backend=_recording_aot_eager) if compiled else forward
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same noise for both
    objective, *results = run(x, mask)
    objective.backward()
    grads = {"x": x.grad, **{name: p.grad for name, p in layer.named_parameters()}}
    return results, grads


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()  # every case compiles its own layer: no recompile limit across cases
    GRAPHS.clear()
    yield
    torch._dynamo.reset()


@needs_compile
@pytest.mark.parametrize("gating", GATINGS)
@pytest.mark.parametrize("kind", ["flat", "hierarchical"])
@pytest.mark.parametrize("backend", ["grouped_mm", "triton"])
def test_compiled_training_step_equals_eager(backend, kind, gating, fresh_dynamo):
    if backend == "triton" or kind == "hierarchical":
        if not ops.triton_available():
            pytest.skip("triton is not installed")
        from fairseq_smoe.ops import triton_experts

        if not triton_experts.COMPILABLE:
            pytest.skip(f"torch {torch.__version__} lacks torch.library.custom_op/register_autograd")
    if backend == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip(f"torch {torch.__version__} has no _grouped_mm")
    dtype = DTYPES[backend]
    layer = build(kind, gating, backend, dtype)
    x = torch.randn(3, 7, 8, dtype=dtype)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, -2:] = True
    mask[-1, -1:] = True
    (eager, eager_grads) = training_step(layer, x, mask, compiled=False)
    (compiled, compiled_grads) = training_step(layer, x, mask, compiled=True)
    tol = TOLERANCES[dtype]
    for name, a, b in zip(["y", "loss", "importance", "load", "counts"], compiled, eager):
        torch.testing.assert_close(a, b, **tol, msg=name)
    assert len(GRAPHS) == 1  # one graph for the step (fullgraph), compiled once
    called = {str(node.target) for node in GRAPHS[0].graph.nodes if node.op == "call_function"}
    if backend == "triton" or kind == "hierarchical":
        assert "fairseq_smoe.grouped_linear.default" in called, sorted(called)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        if grad is None:
            assert compiled_grads[name] is None, name
        else:
            torch.testing.assert_close(compiled_grads[name], grad, **tol, msg=name)


@needs_compile
def test_triton_custom_operators_pass_opcheck():
    """Schema, fake implementation, autograd registration and AOT dispatch of the operators the
    compiled graphs call (torch.library.opcheck), on the Triton interpreter."""
    if not ops.triton_available():
        pytest.skip("triton is not installed")
    from fairseq_smoe.ops import triton_experts
    from fairseq_smoe.ops.resident import group

    if not triton_experts.COMPILABLE:
        pytest.skip(f"torch {torch.__version__} lacks torch.library.custom_op/register_autograd")
    grouping = group(torch.randint(0, 4, (21,)), 3)  # 3 experts and a dropped tail
    x = torch.randn(21, 8, requires_grad=True)
    weight = torch.randn(3, 8, 16, requires_grad=True)
    bias = torch.randn(3, 16, requires_grad=True)
    routing = (grouping.counts_G, grouping.offs_G, grouping.key_S)
    for args in [(x, weight, bias, *routing, True, False), (x, weight, None, *routing, False, False)]:
        torch.library.opcheck(torch.ops.fairseq_smoe.grouped_linear.default, args)
    torch.library.opcheck(torch.ops.fairseq_smoe.grouped_wgrad.default,
                          (x.detach(), torch.randn(21, 16), grouping.offs_G, torch.float32))


@pytest.mark.parametrize("segments", ["one", "host", "device"])
def test_traced_noisy_top_k_equals_the_blocked_function(segments, monkeypatch):
    """What noisy_top_k runs while compiling (whole rows, no out=, no workspace or threads) gives
    the blocked Function's gates, experts, load and logit gradient; run eagerly here."""
    from fairseq_smoe.ops import noisy_topk

    T, E, k = 40, 6, 2
    logits = torch.randn(T, 2 * E, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(T, E, dtype=torch.float64)
    valid = torch.rand(T) > 0.2
    kwargs = {}
    if segments == "host":
        kwargs = dict(segment_rows=[15, 0, 25])
    elif segments == "device":
        kwargs = dict(segment_T=torch.randint(0, 4, (T,)), num_segments=3)  # 3: dropped
    results = []
    for traced in (False, True):
        monkeypatch.setattr(noisy_topk, "_compiling", lambda traced=traced: traced)
        gate, expert, load = noisy_topk.noisy_top_k(logits, noise, valid, k, 1e-2, **kwargs)
        weights = torch.linspace(-1, 1, load.numel(), dtype=load.dtype).reshape(load.shape)
        objective = (gate * torch.arange(gate.numel()).reshape(gate.shape)).sum() + (load * weights).sum()
        (grad,) = torch.autograd.grad(objective, logits)
        results.append((gate, expert, load, grad))
    for name, a, b in zip(["gate", "expert", "load", "grad"], *results):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)
