"""Expert parallelism on a device-resident backend (triton, under the Triton interpreter): two
gloo workers equal one process running the loop on the union batch, and each worker's training
step reads exactly one thing back to the host, the all-to-all split sizes."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (CPU tensors only)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from test_module_expert_parallel import (  # noqa: E402
    ROWS,
    SPLIT,
    TOL,
    WORLD,
    build_case,
    deterministic_noise,
    free_port,
    run_layer,
)

from fairseq_smoe.modules.gating import TopKRouter  # noqa: E402
from fairseq_smoe.ops.counting import count_step  # noqa: E402

CASES = ["flat", "hierarchical", "empty_worker"]


def _worker(rank, port, out_dir):
    from fairseq_smoe.distributed import SumOverWorkers, shard_layer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    torch.set_num_threads(1)
    TopKRouter.draw_noise = deterministic_noise
    results = {}
    for name in CASES:
        bounds = SPLIT[name]
        layer, x, pad, target = build_case(name)
        layer.backend = "triton"
        layer.train()
        shard_layer(layer)
        layer.sum_over_workers = SumOverWorkers()
        start = 0 if rank == 0 else bounds[0]
        end = bounds[0] if rank == 0 else bounds[1]
        run_layer(layer, x, pad, target, slice(start, end), (~pad).sum())  # warm-up
        layer.zero_grad(set_to_none=True)
        with count_step() as counts:
            out = run_layer(layer, x, pad, target, slice(start, end), (~pad).sum())
        for key, grad in out["grads"].items():
            if not key.startswith("experts."):
                dist.all_reduce(grad)
        out["rows"], out["reads"] = (start, end), counts.host_reads
        results[name] = out
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("expert_parallel_resident"))
    mp.start_processes(_worker, args=(free_port(), out_dir), nprocs=WORLD, start_method="spawn")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("name", CASES)
def test_resident_expert_parallel_matches_one_process_loop(name, worker_results, monkeypatch):
    monkeypatch.setattr(TopKRouter, "draw_noise", deterministic_noise)
    layer, x, pad, target = build_case(name)
    layer.backend = "loop"
    layer.train()
    ref = run_layer(layer, x, pad, target, slice(0, ROWS), (~pad).sum())
    per_worker = layer.num_experts // WORLD
    for rank, results in enumerate(worker_results):
        got = results[name]
        start, end = got["rows"]
        # one host read per step: the split sizes (sent and received counts in one transfer)
        assert got["reads"] == ["Tensor.tolist"], got["reads"]
        torch.testing.assert_close(got["y"], ref["y"][start:end], **TOL)
        torch.testing.assert_close(got["x_grad"], ref["x_grad"][start:end], **TOL)
        torch.testing.assert_close(got["balance"], ref["balance"], **TOL)
        for field in ("importance", "load", "counts"):
            torch.testing.assert_close(got[field], ref[field], **TOL)
        for key, grad in ref["grads"].items():
            if key.startswith("experts."):
                grad = grad[rank * per_worker:(rank + 1) * per_worker]
            torch.testing.assert_close(got["grads"][key], grad, **TOL, msg=key)
