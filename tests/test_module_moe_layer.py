"""Module-level checks: the sparse layers equal the dense reference Σ_i G(x)_i E_i(x) (values,
balance statistics and gradients), gradcheck in float64, padding, dtypes, argument errors."""

import pytest
import torch
from moe_reference import dense_hierarchical_moe, dense_moe, randomise_gates
from torch.func import functional_call

from fairseq_smoe.modules import HierarchicalMoELayer, MoELayer

GATINGS = ["noisy_top_k", "top_k", "softmax", "batchwise"]


def make_flat(gating, k=2, num_experts=6, layers=1):
    return randomise_gates(MoELayer(8, 5, num_experts, hidden_dim=7, k=k, gating=gating,
                                    num_hidden_layers=layers, w_importance=0.3, w_load=0.2))


def make_hierarchical(gating):
    return randomise_gates(HierarchicalMoELayer(8, 5, num_groups=3, experts_per_group=4, hidden_dim=7,
                                                k_primary=2, k_secondary=2, gating=gating,
                                                w_importance=0.3, w_load=0.2))


def padding_for(shape):
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[0, -2:] = True
    mask[2, -1:] = True
    return mask


def run_both(layer, reference, x, mask, seed=11):
    torch.manual_seed(seed)
    y, stats = layer(x, mask)
    torch.manual_seed(seed)
    y_ref, loss_ref, importance_ref, load_ref = reference(layer, x, mask)
    return (y, stats), (y_ref, loss_ref, importance_ref, load_ref)


def grads(layer, x, y, loss):
    target = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    objective = (y * target).sum() + loss
    params = [x] + [p for p in layer.parameters()]
    return torch.autograd.grad(objective, params, allow_unused=True)


def assert_same(layer, reference, x, mask):
    x = x.clone().requires_grad_(True)
    (y, stats), (y_ref, loss_ref, importance_ref, load_ref) = run_both(layer, reference, x, mask)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.loss, loss_ref.to(stats.loss.dtype), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats.importance, importance_ref.detach().reshape(stats.importance.shape),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.load, load_ref.detach().reshape(stats.load.shape).float(),
                               atol=1e-4, rtol=1e-5)
    if mask is not None:
        assert y[mask].abs().max().item() == 0.0  # padding comes out as 0
    # Gradients of one objective through both computations (same noise: re-seeded).
    torch.manual_seed(5)
    y, stats = layer(x, mask)
    sparse_grads = grads(layer, x, y, stats.loss)
    torch.manual_seed(5)
    y_ref, loss_ref, _, _ = reference(layer, x, mask)
    dense_grads = grads(layer, x, y_ref, loss_ref)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, g, g_ref in zip(names, sparse_grads, dense_grads):
        if g_ref is None:
            assert g is None or g.abs().max() == 0, name
            continue
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("gating", GATINGS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_flat_layer_equals_dense_reference(gating, training, padded):
    layer = make_flat(gating).train(training)
    x = torch.randn(3, 7, 8)
    assert_same(layer, dense_moe, x, padding_for((3, 7)) if padded else None)


@pytest.mark.parametrize("gating", GATINGS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_hierarchical_layer_equals_dense_reference(gating, training, padded):
    layer = make_hierarchical(gating).train(training)
    x = torch.randn(3, 9, 8)
    assert_same(layer, dense_hierarchical_moe, x, padding_for((3, 9)) if padded else None)


def test_deep_experts_equal_dense_reference():
    layer = make_flat("noisy_top_k", layers=4).train()
    assert_same(layer, dense_moe, torch.randn(4, 5, 8), None)


def test_recompute_activations_gives_the_same_gradients():
    """Recompute runs the experts' forward a second time in backward, into other buffers: MKL's
    AVX-512 sgemm may round differently by buffer alignment (1 ulp seen on AMD EPYC), so the two
    paths agree to float32 rounding, not bit for bit."""
    torch.manual_seed(0)
    layer = make_flat("noisy_top_k", layers=2)
    x = torch.randn(20, 8)
    torch.manual_seed(1)
    y, stats = layer(x)
    expected = torch.autograd.grad((y**2).sum() + stats.loss, list(layer.parameters()))
    layer.experts.recompute_activations = True
    torch.manual_seed(1)
    y2, stats2 = layer(x)
    got = torch.autograd.grad((y2**2).sum() + stats2.loss, list(layer.parameters()))
    torch.testing.assert_close(y2, y, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats2.loss, stats.loss, atol=1e-7, rtol=1e-6)
    for g, g_ref in zip(got, expected):
        torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("gating", ["noisy_top_k", "top_k", "batchwise"])
def test_gradcheck_float64(gating):
    layer = make_flat(gating, k=2, num_experts=4).double().train()
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    names = [n for n, p in layer.named_parameters() if "thresholds" not in n]
    params = tuple(dict(layer.named_parameters())[n].detach().clone().requires_grad_(True) for n in names)

    def f(x, *values):
        torch.manual_seed(3)  # the same noise at every evaluation
        y, stats = functional_call(layer, dict(zip(names, values)), (x,))
        # L_batchwise is a stop-gradient loss for the thresholds alone (G_σ detached in it), so
        # finite differences through x would disagree by design: check the rest of the loss.
        return y, stats.loss - stats.threshold_loss

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


def test_gradcheck_hierarchical_float64():
    layer = make_hierarchical("noisy_top_k").double().train()
    x = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())

    def f(x, *values):
        torch.manual_seed(3)
        y, stats = functional_call(layer, dict(zip(names, values)), (x,))
        return y, stats.loss

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


def test_all_padding_and_empty_input():
    layer = make_flat("noisy_top_k")
    x = torch.randn(2, 3, 8)
    y, stats = layer(x, torch.ones(2, 3, dtype=torch.bool))
    assert y.abs().sum() == 0 and stats.counts.sum() == 0 and stats.num_tokens == 0
    assert torch.isfinite(stats.loss)
    y, stats = layer(torch.randn(0, 8))
    assert y.shape == (0, 5)
    (y.sum() + stats.loss).backward()  # no error on an empty batch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_follows_input(dtype):
    layer = make_flat("noisy_top_k").to(dtype)
    x = torch.randn(4, 6, 8, dtype=dtype, requires_grad=True)
    y, stats = layer(x)
    assert y.dtype == dtype
    (y.float().sum() + stats.loss).backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()
    ref = make_flat("noisy_top_k").eval()
    ref.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    torch.testing.assert_close(layer.eval()(x)[0].float(), ref(x.float())[0], atol=0.05, rtol=0.05)


def test_experts_with_no_tokens_get_zero_gradient():
    layer = make_flat("top_k", k=1, num_experts=6)
    with torch.no_grad():
        layer.gate.w_gate.zero_()
        layer.gate.w_gate[:, 2] = 5.0  # everything goes to expert 2
    x = torch.rand(10, 8) + 0.1
    y, stats = layer(x)
    assert stats.counts.tolist() == [0, 0, 10, 0, 0, 0]
    y.sum().backward()
    w = layer.experts.weights[0].grad
    assert w[2].abs().sum() > 0
    assert w[[0, 1, 3, 4, 5]].abs().sum() == 0


@pytest.mark.parametrize("kwargs, word", [
    ({"k": 0}, "k"),
    ({"k": 7}, "k=7 is larger than num_experts=6"),
    ({"num_experts": 0}, "num_experts"),
    ({"hidden_dim": -3}, "hidden_dim"),
    ({"input_dim": 2.5}, "input_dim"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"gating": "noisy"}, "gating must be one of"),
    ({"noise_epsilon": -1.0}, "noise_epsilon"),
    ({"w_load": -0.1}, "w_load"),
    ({"w_load": float("inf")}, "w_load must be finite"),
    ({"w_importance": float("nan")}, "w_importance must be finite"),
    ({"noise_epsilon": float("inf")}, "noise_epsilon must be finite"),
])
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, word):
    args = dict(input_dim=8, output_dim=5, num_experts=6, hidden_dim=7, k=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=word):
        MoELayer(**args)


@pytest.mark.parametrize("kwargs, word", [
    ({"k_primary": 4}, "k_primary=4 is larger than num_groups=3"),
    ({"k_secondary": 5}, "k_secondary=5 is larger than experts_per_group=4"),
    ({"num_groups": 0}, "num_groups"),
])
def test_hierarchical_bad_arguments(kwargs, word):
    args = dict(input_dim=8, output_dim=5, num_groups=3, experts_per_group=4, hidden_dim=7)
    args.update(kwargs)
    with pytest.raises(ValueError, match=word):
        HierarchicalMoELayer(**args)


def test_bad_inputs_are_clear_errors():
    layer = make_flat("top_k")
    with pytest.raises(ValueError, match=r"input of size \[\.\.\., 8\]"):
        layer(torch.randn(3, 4))
    with pytest.raises(ValueError, match="padding_mask must have shape"):
        layer(torch.randn(3, 4, 8), torch.zeros(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="floating-point inputs; got torch.int64"):
        layer(torch.randint(0, 9, (3, 8)))
    with pytest.raises(TypeError, match=r"input dtype torch.float64 differs .* \(torch.float32\)"):
        layer(torch.randn(3, 8, dtype=torch.float64))
    hierarchical = make_hierarchical("top_k")
    with pytest.raises(TypeError, match="input dtype torch.bfloat16 differs"):
        hierarchical(torch.randn(3, 8, dtype=torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts for the layer
        assert layer(torch.randn(3, 8))[0].shape == (3, 5)


@pytest.mark.parametrize("reuse", [True, False])
def test_two_forwards_before_backward_and_accumulated_gradients(reuse, monkeypatch):
    # The layer reuses large CPU buffers between steps (workspace.py). Two forward passes whose
    # graphs are both alive, then gradients accumulated over two steps, must equal the same
    # computation done one layer at a time on separate copies.
    from fairseq_smoe.ops.workspace import Workspace

    monkeypatch.setattr(Workspace, "enabled", reuse)
    layer = randomise_gates(MoELayer(64, 32, 8, 256, k=2, gating="top_k"))
    xa, xb = torch.randn(1024, 64), torch.randn(1024, 64)  # hidden rows: 2 MiB, reused
    for _ in range(2):  # gradient accumulation over two steps
        ya, _ = layer(xa)
        yb, _ = layer(xb)
        ((ya**2).sum() + (3 * yb).sum()).backward()
    copies = [MoELayer(64, 32, 8, 256, k=2, gating="top_k") for _ in range(2)]
    for copy in copies:
        copy.load_state_dict(layer.state_dict())
    (copies[0](xa)[0] ** 2).sum().backward()
    (3 * copies[1](xb)[0]).sum().backward()
    for (name, p), pa, pb in zip(layer.named_parameters(), copies[0].parameters(), copies[1].parameters()):
        if p.grad is not None:
            expected = 2 * (pa.grad + pb.grad)
            torch.testing.assert_close(p.grad, expected, atol=1e-3, rtol=1e-4, msg=name)
    torch.testing.assert_close(ya, copies[0](xa)[0])
    torch.testing.assert_close(yb, copies[1](xb)[0])


def test_layer_pickles_and_deep_copies():
    import copy
    import pickle

    layer = make_hierarchical("noisy_top_k").eval()
    x = torch.randn(5, 8)
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        torch.testing.assert_close(clone(x)[0], layer(x)[0])


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("chunk_rows", [4096, 4])
def test_fused_experts_and_combine_equal_experts_then_combine(monkeypatch, recompute, threads,
                                                              chunk_rows):
    """The loop backend's feed_forward_and_combine (one Function: the gate gradient and the
    scaled output gradient are formed inside the expert loop) equals its experts followed by
    loop_dispatch.combine: output and the gradients of input, gates and every parameter; also
    when experts with many rows go through backward in chunks (here of 4 rows)."""
    from fairseq_smoe.modules.experts import FeedForwardExperts
    from fairseq_smoe.ops import loop_experts as experts_module
    from fairseq_smoe.ops.loop_dispatch import combine


    torch.manual_seed(0)
    experts = FeedForwardExperts(6, 5, 7, 4, num_hidden_layers=2, recompute_activations=recompute)
    counts = [3, 0, 9, 1, 5, 6]  # one expert without rows
    S, T = sum(counts), 11
    x = torch.randn(S, 5, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(S, dtype=torch.float64, requires_grad=True)
    row = torch.randint(0, T, (S,))
    experts.double()
    grad_y = torch.randn(T, 4, dtype=torch.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        for fused in (True, False):  # the unfused reference never splits an expert's rows
            monkeypatch.setattr(experts_module, "CHUNK_ROWS", chunk_rows if fused else 2048)
            experts.zero_grad(set_to_none=True)
            x.grad = gate.grad = None
            params = (experts.weights, experts.biases, recompute)
            if fused:
                y = experts_module.feed_forward_and_combine(x, counts, row, gate, T, *params)
            else:
                y = combine(experts_module.feed_forward(x, counts, *params), row, gate, T)
            y.backward(grad_y)
            results.append([y.detach(), x.grad, gate.grad, *[p.grad for p in experts.parameters()]])
    finally:
        torch.set_num_threads(previous)
    for fused, unfused in zip(*results):
        torch.testing.assert_close(fused, unfused)
    assert results[0][3 + 0][1].abs().sum() == 0  # expert 1 had no rows: zero weight gradient


def test_half_precision_experts_are_not_chunked(monkeypatch):
    """A bf16 weight gradient summed over chunks would be rounded after every chunk: half
    precision keeps one product per expert whatever CHUNK_ROWS is (bit-identical results)."""
    from fairseq_smoe.modules.experts import FeedForwardExperts
    from fairseq_smoe.ops import loop_experts as experts_module

    torch.manual_seed(0)
    experts = FeedForwardExperts(3, 8, 16, 8).to(torch.bfloat16)
    counts = [40, 3, 21]
    x = torch.randn(sum(counts), 8, dtype=torch.bfloat16)
    grads = []
    for chunk_rows in (4096, 4):
        monkeypatch.setattr(experts_module, "CHUNK_ROWS", chunk_rows)
        experts.zero_grad(set_to_none=True)
        y = experts_module.feed_forward(x, counts, experts.weights, experts.biases)
        y.float().square().sum().backward()
        grads.append([p.grad.clone() for p in experts.parameters()])
    for big, small in zip(*grads):
        assert torch.equal(big, small)


def test_backends_run_the_experts_as_the_reference_forward():
    """FeedForwardExperts.forward (a plain loop over the experts) is what the backends' own
    feed_forward computes, values and gradients, an expert without rows included."""
    from fairseq_smoe import ops
    from fairseq_smoe.modules.experts import FeedForwardExperts

    torch.manual_seed(0)
    experts = FeedForwardExperts(4, 8, 16, 8, num_hidden_layers=2)
    counts = [3, 0, 5, 2]
    x = torch.randn(sum(counts), 8)
    grad_y = torch.randn(sum(counts), 8)
    expected = experts(x, counts)
    expected_grads = torch.autograd.grad(expected, list(experts.parameters()), grad_y)
    for name in ("loop", "grouped_mm"):
        backend = ops.get_backend(name, x.device, x.dtype, (8, 16, 16, 8))
        y = backend.feed_forward(experts, x, counts)
        torch.testing.assert_close(y, expected, msg=name)
        for got, want in zip(torch.autograd.grad(y, list(experts.parameters()), grad_y), expected_grads):
            torch.testing.assert_close(got, want, msg=name)


# The grouped_mm and triton backends (fairseq_smoe/ops) against the loop and the dense reference,
# their choice and errors: tests/test_module_backends.py.


@pytest.mark.parametrize("gating", ["noisy_top_k", "batchwise"])
def test_hierarchical_state_dict_with_one_gate_per_group_loads(gating):
    """Checkpoints of the layer before its secondary gates were stacked (one w_gate, w_noise,
    thresholds or log_thresholds per group) load into the stacked parameters."""
    layer = randomise_gates(HierarchicalMoELayer(8, 8, 3, 4, 16, gating=gating))
    old = {}
    for key, tensor in layer.state_dict().items():
        head, _, name = key.rpartition(".")
        if head == "secondary_gates":
            for i in range(3):
                if name == "log_thresholds":  # the oldest files stored T itself
                    old[f"{head}.{i}.thresholds"] = tensor[i].exp()
                else:
                    old[f"{head}.{i}.{name}"] = tensor[i].clone()
        else:
            old[key] = tensor
    loaded = HierarchicalMoELayer(8, 8, 3, 4, 16, gating=gating)
    loaded.load_state_dict(old)
    for key, tensor in layer.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], tensor)
    # fairseq-train's resume refuses the optimizer moments saved with such a state
    assert loaded.secondary_gates.converted_old_state
    assert not getattr(layer.secondary_gates, "converted_old_state", False)


@pytest.mark.parametrize("kind", ["flat", "hierarchical"])
def test_script_trace_and_double_backward_are_one_clear_error(kind):
    """What the layer cannot do fails where it starts, saying what to use instead (it failed
    deep inside torch)."""
    from fairseq_smoe.modules import HierarchicalMoELayer

    layer = MoELayer(8, 8, 4, 16, k=2) if kind == "flat" else HierarchicalMoELayer(8, 8, 2, 2, 16, 1, 1)
    x = torch.randn(5, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="cannot be compiled by torch.jit.script.*torch.compile"):
        torch.jit.script(layer)
    with pytest.raises(RuntimeError, match="cannot be traced by torch.jit.trace.*torch.compile"):
        torch.jit.trace(lambda t: layer(t)[0], (x,))
    y, stats = layer(x)
    with pytest.raises(RuntimeError, match="first-order gradients only: backward with create_graph=True"):
        torch.autograd.grad(y.square().sum() + stats.loss, x, create_graph=True)
    (grad,) = torch.autograd.grad(layer(x)[0].sum(), x)  # first order is fine
    assert grad.shape == x.shape
