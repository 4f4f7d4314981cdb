"""The speed levers must not change results: reused buffers (workspace.py) are never
handed out while anything still holds them, and the fused dispatch/combine/expert Functions give
the same values and gradients as with reuse disabled."""

import copy

import pytest
import torch

from fairseq_smoe.modules import HierarchicalMoELayer, MoELayer
from fairseq_smoe.ops import workspace as workspace_module
from fairseq_smoe.ops.workspace import Workspace


@pytest.fixture
def reuse_small_buffers(monkeypatch):
    """Pool every buffer, however small, so the tests' tiny layers exercise reuse."""
    monkeypatch.setattr(workspace_module, "MIN_BYTES", 0)
    monkeypatch.setattr(Workspace, "enabled", True)


def make_layer(kind, recompute=False, layers=1):
    torch.manual_seed(0)
    if kind == "flat":
        layer = MoELayer(8, 8, num_experts=6, hidden_dim=16, k=2, num_hidden_layers=layers,
                         recompute_activations=recompute)
    else:
        layer = HierarchicalMoELayer(8, 8, num_groups=3, experts_per_group=4, hidden_dim=16,
                                     num_hidden_layers=layers, recompute_activations=recompute)
    with torch.no_grad():  # non-zero gates, so routing depends on the input
        for name, p in layer.named_parameters():
            if "gate" in name or "noise" in name:
                p.normal_(0, 0.5)
    return layer


def step(layer, x, seed, grad_seed=None):
    torch.manual_seed(seed)
    y, stats = layer(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed or seed))
    torch.autograd.backward([y, stats.loss], [g, None])
    return y


def grads(layer):
    return {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


def run_steps(layer, xs):
    """Several training steps with grads cleared between them (as fairseq does)."""
    out = []
    for i, x in enumerate(xs):
        for p in layer.parameters():
            p.grad = None
        x = x.clone().requires_grad_()
        y = step(layer, x, seed=i)
        out.append((y.detach().clone(), x.grad.clone(), grads(layer)))
    return out


def assert_same(a, b):
    for (ya, gxa, ga), (yb, gxb, gb) in zip(a, b):
        torch.testing.assert_close(ya, yb)
        torch.testing.assert_close(gxa, gxb)
        assert ga.keys() == gb.keys()
        for name in ga:
            torch.testing.assert_close(ga[name], gb[name], msg=name)


@pytest.mark.parametrize("kind", ["flat", "hierarchical"])
@pytest.mark.parametrize("recompute,layers", [(False, 1), (True, 1), (False, 2)])
def test_reuse_gives_same_results_over_steps(reuse_small_buffers, monkeypatch, kind, recompute, layers):
    xs = [torch.randn(5, 7, 8), torch.randn(4, 7, 8), torch.randn(6, 5, 8)]  # sizes vary
    layer = make_layer(kind, recompute, layers)
    reference = copy.deepcopy(layer)
    with_reuse = run_steps(layer, xs)
    assert layer.workspace.nbytes() > 0  # gather, experts and combine (the loop backend's)
    monkeypatch.setattr(Workspace, "enabled", False)
    assert_same(with_reuse, run_steps(reference, xs))


def test_kept_outputs_and_gradients_are_never_overwritten(reuse_small_buffers):
    layer = make_layer("flat")
    x1 = torch.randn(40, 8, requires_grad=True)
    y1 = step(layer, x1, seed=1)
    kept_y, kept_grads = y1.detach().clone(), grads(layer)
    kept_x_grad = x1.grad.clone()
    held_grad_refs = {n: p.grad for n, p in layer.named_parameters()}  # user keeps them
    for p in layer.parameters():
        p.grad = None
    step(layer, torch.randn(40, 8, requires_grad=True), seed=2)
    torch.testing.assert_close(y1.detach(), kept_y)
    torch.testing.assert_close(x1.grad, kept_x_grad)
    for name, g in held_grad_refs.items():
        torch.testing.assert_close(g, kept_grads[name], msg=name)


def test_gradient_accumulation_over_two_backwards(reuse_small_buffers, monkeypatch):
    x1, x2 = torch.randn(30, 8), torch.randn(30, 8)
    layer = make_layer("flat")
    reference = copy.deepcopy(layer)
    step(layer, x1, seed=1)
    step(layer, x2, seed=2)  # .grad kept: accumulated, the first grads' buffers are busy
    monkeypatch.setattr(Workspace, "enabled", False)
    step(reference, x1, seed=1)
    step(reference, x2, seed=2)
    for (name, p), q in zip(layer.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_two_forwards_before_one_backward_and_retain_graph(reuse_small_buffers, monkeypatch):
    def run(layer):
        x = torch.randn(30, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
        torch.manual_seed(5)
        y1, s1 = layer(x)
        y2, s2 = layer(x * 2)  # second use while the first graph still holds its buffers
        loss = (y1 * y2).sum() + y1.pow(2).sum() + s1.loss + s2.loss
        loss.backward(retain_graph=True)
        loss.backward()  # retained graph: buffers saved for backward must be intact
        return x.grad.clone(), grads(layer)
    layer = make_layer("hierarchical")
    reference = copy.deepcopy(layer)
    gx, g = run(layer)
    monkeypatch.setattr(Workspace, "enabled", False)
    gx_ref, g_ref = run(reference)
    torch.testing.assert_close(gx, gx_ref)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], msg=name)


def test_eval_and_no_grad_paths_match(reuse_small_buffers, monkeypatch):
    layer = make_layer("flat").eval()
    x = torch.randn(3, 9, 8)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[1, 5:] = True
    with torch.no_grad():
        y_reuse, _ = layer(x, mask)
        y_again, _ = layer(x, mask)
    monkeypatch.setattr(Workspace, "enabled", False)
    y_plain, _ = layer(x, mask)
    torch.testing.assert_close(y_reuse, y_plain.detach())
    torch.testing.assert_close(y_again, y_plain.detach())
    assert torch.all(y_reuse[1, 5:] == 0)


def test_workspace_is_not_copied_or_pickled(reuse_small_buffers):
    layer = make_layer("flat")
    step(layer, torch.randn(20, 8), seed=0)
    assert layer.workspace.nbytes() > 0
    assert copy.deepcopy(layer).workspace.nbytes() == 0
    assert "workspace" not in " ".join(layer.state_dict().keys())


@pytest.mark.parametrize("kind", ["flat", "hierarchical"])
def test_experts_split_over_threads_match_one_thread(monkeypatch, kind):
    """The expert loop runs on torch.get_num_threads() threads (experts split by rows); the
    results must not depend on it."""
    from fairseq_smoe.ops import threads as threads_module

    def run(threads, split):
        monkeypatch.setattr(threads_module, "ENABLED", split)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = run_steps(copy.deepcopy(layer), xs)
            assert torch.get_num_threads() == threads  # restored after the threaded loop
            return out
        finally:
            torch.set_num_threads(previous)

    layer = make_layer(kind, layers=2)
    xs = [torch.randn(64, 8), torch.randn(50, 8)]
    assert_same(run(3, True), run(1, False))


def test_shared_queue_runs_every_item_once_on_every_thread(monkeypatch):
    """for_each_shared: each item exactly once, in order from the queue, spread over the threads,
    with the part index of the thread that ran it; an error in one item reaches the caller."""
    import threading
    import time

    from fairseq_smoe.ops import threads as threads_module

    monkeypatch.setattr(threads_module, "ENABLED", True)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen, lock = [], threading.Lock()

        def work(part, i):
            time.sleep(0.002)  # long enough for the second thread to take items too
            with lock:
                seen.append((i, part, threading.get_ident()))

        threads_module.for_each_shared(40, work, torch.device("cpu"))
        assert sorted(i for i, _, _ in seen) == list(range(40))
        assert {part for _, part, _ in seen} == {0, 1}
        # One part index per thread: scratch buffers indexed by part are never shared.
        assert len({(part, ident) for _, part, ident in seen}) == 2

        def failing(part, i):
            if i == 7:
                raise RuntimeError("item 7")

        with pytest.raises(RuntimeError, match="item 7"):
            threads_module.for_each_shared(20, failing, torch.device("cpu"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_workspace_pickles_empty(reuse_small_buffers):
    import pickle

    layer = make_layer("flat")
    step(layer, torch.randn(64, 8), seed=0)
    assert layer.workspace.nbytes() > 0
    assert pickle.loads(pickle.dumps(layer.workspace)).nbytes() == 0


def test_two_threads_never_take_the_same_buffer(reuse_small_buffers, monkeypatch):
    """The check that a buffer is free and the taking of it are one step: a thread switch in
    between (forced here by a pause inside the check) must not let both threads take it."""
    import threading
    import time

    real_count = workspace_module._storage_use_count

    def slow_count(cdata):
        count = real_count(cdata)
        time.sleep(0.05)  # the other thread runs here
        return count

    workspace = Workspace()
    workspace.empty("x", (4,), torch.float32, torch.device("cpu"))  # a kept, free buffer
    monkeypatch.setattr(workspace_module, "_storage_use_count", slow_count)
    taken, start = [None, None], threading.Barrier(2)

    def take(i):
        start.wait()
        taken[i] = workspace.empty("x", (4,), torch.float32, torch.device("cpu"))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert taken[0].untyped_storage().data_ptr() != taken[1].untyped_storage().data_ptr()


@pytest.mark.parametrize("kind", ["flat", "hierarchical"])
def test_one_layer_called_from_two_threads_gives_each_its_own_result(reuse_small_buffers, kind):
    """Inference from two threads at once on one layer (eval, no_grad): every output equals the
    layer's output for that input alone."""
    import threading

    layer = make_layer(kind).eval()
    inputs = [torch.randn(64, 8, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with torch.no_grad():
        expected = [layer(x)[0].clone() for x in inputs]
    wrong = []

    def serve(offset):
        with torch.no_grad():
            for round_ in range(15):
                i = (offset + round_) % len(inputs)
                # A race gave outputs off by up to 1.05; rounding between runs would be ~1e-7.
                if not torch.allclose(layer(inputs[i])[0], expected[i], rtol=1e-5, atol=1e-5):
                    wrong.append(i)

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []
