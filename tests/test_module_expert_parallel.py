"""Expert parallelism at the layer level: two gloo workers on CPU against one process.

One process holding all experts runs the whole batch; two workers each run part of the rows
with half of the experts (tokens travel by all-to-all). Outputs, balance loss, statistics and
every gradient must agree to 1e-5 (fp32), for flat and hierarchical layers, noisy top-k
included (with noise made a deterministic function of the clean logits on both sides).
"""

import argparse
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from fairseq_smoe.modules import HierarchicalMoELayer, MoELayer
from fairseq_smoe.modules.gating import TopKRouter

WORLD = 2
ROWS = 19
SPLIT = {"flat": (7, 19), "hierarchical": (11, 19), "softmax": (5, 19), "empty_worker": (19, 19)}
TOL = dict(atol=1e-5, rtol=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deterministic_noise(gate, t):
    """Stands in for the gates' noise draw (``TopKRouter.draw_noise``, every noisy gate's): the
    same 'noise' for a row whatever batch it is in, so split and unsplit runs see identical
    noisy logits."""
    columns = torch.arange(t.shape[-1], dtype=t.dtype, device=t.device)
    return torch.sin(3.0 * t.detach() + 0.7 * columns + 0.3)


def build_case(name):
    torch.manual_seed(7)
    if name == "hierarchical":
        layer = HierarchicalMoELayer(6, 5, num_groups=4, experts_per_group=2, hidden_dim=7,
                                     k_primary=2, k_secondary=2, num_hidden_layers=2)
    elif name == "softmax":
        layer = MoELayer(6, 5, num_experts=4, hidden_dim=7, gating="softmax")
    else:
        layer = MoELayer(6, 5, num_experts=8, hidden_dim=7, k=3)
    with torch.no_grad():  # gates start at zero (App. A); random ones exercise the routing
        for name_, p in layer.named_parameters():
            if "gate" in name_ or "noise" in name_:
                p.copy_(torch.randn(p.shape) * 0.5)
    x = torch.randn(ROWS, 6)
    pad = torch.rand(ROWS) < 0.2
    pad[0] = False
    target = torch.randn(ROWS, 5)
    return layer, x, pad, target


def expert_keys(layer):
    return [n for n, _ in layer.named_parameters() if n.startswith("experts.")]


def run_layer(layer, x, pad, target, rows, real_total):
    """Forward + backward of one worker's share (or of everything) of the objective
    Σ_rows <y, target> + stats.loss, split so that the workers' parts add up to it."""
    x = x[rows].clone().requires_grad_(True)
    y, stats = layer(x, pad[rows])
    share = (~pad[rows]).sum() / real_total
    loss = (y * target[rows]).sum() + share * stats.loss
    loss.backward()
    return {
        "y": y.detach(), "x_grad": x.grad, "balance": stats.loss.detach(),
        "importance": stats.importance, "load": stats.load, "counts": stats.counts,
        "grads": {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None},
    }


def _layer_cases(rank):
    from fairseq_smoe.distributed import SumOverWorkers, shard_layer

    results = {}
    for name, bounds in SPLIT.items():
        layer, x, pad, target = build_case(name)
        layer.train()
        shard_layer(layer)  # grad_scale 1: exact gradient of the summed objective
        layer.sum_over_workers = SumOverWorkers()
        start = 0 if rank == 0 else bounds[0]
        end = bounds[0] if rank == 0 else bounds[1]
        out = run_layer(layer, x, pad, target, slice(start, end), (~pad).sum())
        for key, grad in out["grads"].items():  # replicated parameters: sum over workers
            if not key.startswith("experts."):
                dist.all_reduce(grad)
        layer.eval()
        with torch.no_grad():  # evaluation: experts still exchanged, statistics per worker
            out["y_eval"], eval_stats = layer(x[start:end], pad[start:end])
            out["eval_counts"] = eval_stats.counts
        out["rows"] = (start, end)
        out["expert_shapes"] = {n: tuple(p.shape) for n, p in layer.named_parameters()
                                if n.startswith("experts.")}
        results[name] = out
    return results


def _worker(rank, port, out_dir):
    """Everything the tests below compare, computed in one pair of workers (spawning is the
    slow part)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    torch.set_num_threads(1)
    TopKRouter.draw_noise = deterministic_noise
    results = {"layer": _layer_cases(rank)}
    from fairseq_smoe.models.parallel import setup_expert_parallel

    try:  # 3 experts cannot be shared equally by 2 workers: refused before anything changes
        setup_expert_parallel(nn.Sequential(MoELayer(4, 4, num_experts=3, hidden_dim=4, k=2)),
                              argparse.Namespace(moe_expert_parallel=True))
        results["indivisible"] = None
    except ValueError as error:
        results["indivisible"] = str(error)
    for backend in ("pytorch_ddp", "legacy_ddp"):
        results[backend] = _ddp_case(rank, backend)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("expert_parallel"))
    mp.start_processes(_worker, args=(free_port(), out_dir), nprocs=WORLD, start_method="spawn")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(SPLIT))
def test_expert_parallel_layer_matches_single_process(name, worker_results, monkeypatch):
    monkeypatch.setattr(TopKRouter, "draw_noise", deterministic_noise)
    layer, x, pad, target = build_case(name)
    layer.train()
    ref = run_layer(layer, x, pad, target, slice(0, ROWS), (~pad).sum())
    num_experts = layer.num_experts
    for rank, results in enumerate(worker_results):
        got = results["layer"][name]
        start, end = got["rows"]
        torch.testing.assert_close(got["y"], ref["y"][start:end], **TOL)
        torch.testing.assert_close(got["x_grad"], ref["x_grad"][start:end], **TOL)
        # balance loss and statistics describe the global batch on every worker (§1.2)
        torch.testing.assert_close(got["balance"], ref["balance"], **TOL)
        for field in ("importance", "load", "counts"):
            torch.testing.assert_close(got[field], ref[field], **TOL)
        per_worker = num_experts // WORLD
        for key, grad in ref["grads"].items():
            if key.startswith("experts."):
                assert got["expert_shapes"][key][0] == per_worker  # half the experts each
                torch.testing.assert_close(
                    got["grads"][key], grad[rank * per_worker:(rank + 1) * per_worker], **TOL)
            else:
                torch.testing.assert_close(got["grads"][key], grad, **TOL)
    layer.eval()
    with torch.no_grad():
        y_eval, eval_stats = layer(x, pad)
    for results in worker_results:
        start, end = results["layer"][name]["rows"]
        torch.testing.assert_close(results["layer"][name]["y_eval"], y_eval[start:end], **TOL)
    torch.testing.assert_close(sum(r["layer"][name]["eval_counts"] for r in worker_results),
                               eval_stats.counts)
    if name != "softmax":
        assert ref["balance"] > 0
    assert any(k.startswith("experts.") for k in ref["grads"])


# ---------------------------------------------------------------------------------------------
# The fairseq gradient contract: DDP averages replicated gradients, the trainer multiplies by
# W / sample_size, the clip norm counts each expert once, DDP leaves the experts alone.


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.proj = nn.Linear(6, 6)
        self.moe = MoELayer(6, 6, num_experts=4, hidden_dim=5, k=2)
        with torch.no_grad():
            self.moe.gate.w_gate.copy_(torch.randn(6, 4))
            self.moe.gate.w_noise.copy_(torch.randn(6, 4) * 0.3)

    def forward(self, x):
        return self.moe(self.proj(x))


def fairseq_like_step(model, x, target):
    """Per-worker loss as the smoe criterion builds it (summed CE-like term + sample_size ·
    balance), fairseq's gradient normalisation (× W / Σ sample_size)."""
    y, stats = model(x)
    loss = (y * target).sum() + x.shape[0] * stats.loss
    loss.backward()
    return loss.detach()


def _ddp_case(rank, backend):
    from fairseq_smoe.plugin import install

    install()  # registers the plugin with fairseq, installs its patches
    from fairseq_smoe.compat.trainer_hooks import clip_grad_norm_with_sharded_experts, current_plan
    from fairseq_smoe.distributed.checkpoints import SHARD_META_KEY
    from fairseq_smoe.models.parallel import setup_expert_parallel

    model = TinyModel()
    model.train()
    setup_expert_parallel(model, argparse.Namespace(moe_expert_parallel=True))
    if backend == "pytorch_ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)
    else:
        from fairseq.distributed import LegacyDistributedDataParallel

        wrapped = LegacyDistributedDataParallel(model, process_group=None, buffer_size=2**20)
    experts_after_wrap = {n: p.detach().clone() for n, p in model.named_parameters()
                          if n.startswith("moe.experts.")}
    torch.manual_seed(11)
    x, target = torch.randn(10, 6), torch.randn(10, 6)
    rows = slice(0, 4) if rank == 0 else slice(4, 10)
    fairseq_like_step(wrapped, x[rows], target[rows])
    if backend != "pytorch_ddp":
        wrapped.all_reduce_grads()
    for p in model.parameters():  # the trainer's multiply_grads(W / sample_size)
        p.grad.mul_(WORLD / 10)
    grad_norm = clip_grad_norm_with_sharded_experts(list(model.parameters()), 0.0)
    return {
        "experts_after_wrap": experts_after_wrap,
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "grad_norm": grad_norm,
        "state": {"model": model.state_dict(), SHARD_META_KEY: current_plan(),
                  "optimizer_history": [{"num_updates": 1}]},
    }


def test_world_size_that_does_not_divide_the_experts_is_refused(worker_results):
    for results in worker_results:
        assert "2 workers cannot hold equal shares of the 3 experts" in results["indivisible"]
        assert "--no-moe-expert-parallel" in results["indivisible"]


@pytest.mark.parametrize("backend", ["pytorch_ddp", "legacy_ddp"])
def test_fairseq_gradient_contract(backend, worker_results, monkeypatch):
    from fairseq_smoe.distributed.checkpoints import merge_expert_shards

    shards = [results[backend] for results in worker_results]

    monkeypatch.setattr(TopKRouter, "draw_noise", deterministic_noise)
    model = TinyModel()
    model.train()
    full_experts = {n: p.detach().clone() for n, p in model.named_parameters()
                    if n.startswith("moe.experts.")}
    torch.manual_seed(11)
    x, target = torch.randn(10, 6), torch.randn(10, 6)
    fairseq_like_step(model, x, target)
    for p in model.parameters():
        p.grad.mul_(1 / 10)
    ref_norm = torch.norm(torch.stack([p.grad.norm() for p in model.parameters()]))

    for rank, shard in enumerate(shards):
        for key, value in shard["experts_after_wrap"].items():  # DDP did not overwrite them
            torch.testing.assert_close(value, full_experts[key][rank * 2:(rank + 1) * 2])
        for key, p in model.named_parameters():
            expected = p.grad[rank * 2:(rank + 1) * 2] if key.startswith("moe.experts.") else p.grad
            torch.testing.assert_close(shard["grads"][key], expected, **TOL)
        torch.testing.assert_close(shard["grad_norm"], ref_norm, **TOL)

    merged = merge_expert_shards([s["state"] for s in shards])
    full_state = model.state_dict()
    assert set(merged["model"]) == set(full_state)
    for key, value in full_state.items():
        torch.testing.assert_close(merged["model"][key], value)
