"""Experts sharded across data-parallel workers (paper §3.1).

Gates, embeddings and LSTMs stay replicated; each of W workers holds experts
[r·E/W, (r+1)·E/W) of every MoE layer (``layer.experts`` is that share: ``FeedForwardExperts.shard``,
same state-dict keys). ``ExpertParallel`` is set on the layer as ``layer.wrap_backend`` (as
``SumOverWorkers`` is set as ``layer.sum_over_workers``) and wraps whatever backend runs the
experts locally (fairseq_smoe/ops). Its ``experts_and_combine``:

    1. groups the assignments by (global) expert and gathers their rows (local backend):
       rows for experts owned by worker v are contiguous
    2. all-to-all of the per-expert counts, so every worker knows how many rows it will
       receive; sent and received counts come to the host in one read (the sizes of step 3)
    3. all-to-all of the rows; received rows are grouped (source worker, expert) and are
       reordered to (expert, source worker) so each local expert runs once on its block
    4. the local experts run (local backend's ``feed_forward``); outputs go back the same way
       (reverse all-to-all) and are added into their rows (local backend's ``combine``)

Every expert therefore sees the examples of all workers: its batch is k·b·W/E instead of
k·b/E (§3.1). No capacity limit, nothing dropped. The exchanges are differentiable, so an
expert's weight gradient collects the contributions of every worker's tokens: it must not be
all-reduced. Hierarchical layers shard whole groups (their experts are stored group-major).
"""

import copy
from typing import Optional, Tuple

import torch
from torch import distributed as dist

from ..modules.experts import FeedForwardExperts
from ..modules.hierarchical_moe import HierarchicalMoELayer
from .all_to_all import GroupRef, all_to_all, exchange_counts


def expert_range(num_experts: int, rank: int, world_size: int) -> Tuple[int, int]:
    """[first, end) of the experts that worker ``rank`` of ``world_size`` holds."""
    per_worker = num_experts // world_size
    return rank * per_worker, (rank + 1) * per_worker


def check_shardable(layer, world_size: int, name: str = "") -> None:
    """A clear error unless ``world_size`` workers can hold equal, whole shares of the layer."""
    where = f" '{name}'" if name else ""
    if isinstance(layer, HierarchicalMoELayer):
        if layer.num_groups % world_size:
            raise ValueError(
                f"expert parallelism: {world_size} workers cannot hold equal numbers of whole "
                f"groups of the hierarchical MoE layer{where} ({layer.num_groups} groups of "
                f"{layer.experts_per_group} experts); use a --moe-groups that is a multiple of "
                f"{world_size}, a world size that divides {layer.num_groups}, or "
                f"--no-moe-expert-parallel to replicate the experts")
    elif layer.num_experts % world_size:
        raise ValueError(
            f"expert parallelism: {world_size} workers cannot hold equal shares of the "
            f"{layer.num_experts} experts of MoE layer{where}; use a --moe-num-experts that is a "
            f"multiple of {world_size}, a world size that divides {layer.num_experts}, or "
            f"--no-moe-expert-parallel to replicate the experts")


class _ScaleGrad:
    """Gradient hook on an expert parameter: multiplies its gradient by ``scale``."""

    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.scale


class ExpertParallel:
    """``layer.wrap_backend`` for expert parallelism: called with the backend that runs the
    experts locally, it returns itself bound to it, a backend (the interface of
    fairseq_smoe/ops) whose ``experts_and_combine`` runs every assignment on the worker that
    holds its expert. ``group``, ``gather`` and ``grouped_matmul`` are the local backend's.

    The layer's ``experts`` must hold this worker's share (``shard_layer`` sets both)."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        self.group_ref = GroupRef(group)
        self.local = None  # the backend that runs the experts here (set by ``__call__``)

    def __call__(self, backend) -> "ExpertParallel":
        bound = copy.copy(self)
        bound.local = backend
        return bound

    @property
    def name(self) -> str:
        return self.local.name

    @property
    def resident(self) -> bool:
        return self.local.resident

    def group(self, key_A, num_groups):
        return self.local.group(key_A, num_groups)

    def gather(self, x_TD, row_S, workspace=None, name="rows"):
        return self.local.gather(x_TD, row_S, workspace, name)

    def grouped_matmul(self, x_SD, grouping, weight_GIO):
        return self.local.grouped_matmul(x_SD, grouping, weight_GIO)

    def experts_and_combine(self, experts, x_TD, row_A, expert_A, gate_A, num_experts: int,
                            workspace=None):
        local, group = self.local, self.group_ref.group
        W, El = self.group_ref.world_size, experts.num_experts
        if El * W != num_experts:
            raise ValueError(f"{W} workers holding {El} experts each cannot run a layer of "
                             f"{num_experts} experts")
        # 1. rows grouped by expert; a device-resident grouping ends with a dropped tail
        grouping = local.group(expert_A, num_experts)
        row_S = row_A.index_select(0, grouping.order_S)
        gate_S = gate_A.index_select(0, grouping.order_S)
        x_SD = local.gather(x_TD, row_S, workspace, "x_SD")
        # 2. the counts go to their workers on the device; what this worker sends and receives
        # comes back to the host in one read (the all-to-all needs the sizes)
        counts_WE = grouping.counts_G.to(torch.long).reshape(W, El)
        received_WE = exchange_counts(counts_WE, group)
        sizes = torch.cat([counts_WE.reshape(-1), received_WE.reshape(-1)]).tolist()
        counts = sizes[:num_experts]
        received = [sizes[num_experts + w * El:num_experts + (w + 1) * El] for w in range(W)]
        kept = sum(counts)
        send_splits = [sum(counts[v * El:(v + 1) * El]) for v in range(W)]
        recv_splits = [sum(row) for row in received]
        local_counts = [sum(received[w][e] for w in range(W)) for e in range(El)]
        # 3. rows to their experts' workers, (source worker, expert) blocks → (expert, source
        # worker) blocks
        x_RD = all_to_all(x_SD[:kept], send_splits, recv_splits, group)
        order_R = _expert_major_order(received_WE, sum(recv_splits))
        x_LD = x_RD if order_R is None else x_RD[order_R]
        # 4. the local experts, outputs back to the workers the rows came from, and added up
        y_LO = local.feed_forward(experts, x_LD, local_counts, workspace)
        if order_R is None:
            y_RO = y_LO
        else:
            inverse_R = torch.empty_like(order_R)
            inverse_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
            y_RO = y_LO[inverse_R]
        y_SO = all_to_all(y_RO, recv_splits, send_splits, group)
        return local.combine(y_SO, row_S[:kept], gate_S[:kept], x_TD.shape[0], workspace)

    def __repr__(self) -> str:
        return f"ExpertParallel(local={None if self.local is None else self.local.name})"


def _expert_major_order(received_WE: torch.Tensor, num_rows: int):
    W, El = received_WE.shape
    if El == 1 or W == 1:
        return None  # already grouped by expert
    block_B = torch.arange(W * El, device=received_WE.device)
    block_R = torch.repeat_interleave(block_B, received_WE.reshape(-1), output_size=num_rows)
    key_R = (block_R % El) * W + block_R // El
    return torch.argsort(key_R, stable=True)


def is_expert_shard(module) -> bool:
    """Whether ``module`` is a worker's share of a layer's experts: a ``FeedForwardExperts``
    whose parameters ``shard_layer`` marked ``moe_expert_shard`` (what checkpoints shard)."""
    return isinstance(module, FeedForwardExperts) and any(
        getattr(p, "moe_expert_shard", False) for p in module.parameters())


def shard_layer(layer, group: Optional[dist.ProcessGroup] = None, grad_scale: float = 1.0,
                name: str = "") -> FeedForwardExperts:
    """Make ``layer`` expert-parallel: ``layer.experts`` becomes this worker's share of the
    (identically initialised on every worker) full experts, so W workers together hold exactly
    the experts one process would, and ``layer.wrap_backend`` an ``ExpertParallel``.

    The share's parameters are marked ``expert`` (fairseq's convention for parameters that
    differ between workers: its legacy DDP does not all-reduce them; our clip_grad_norm_ counts
    each of them once) and ``moe_expert_shard`` (left out of DDP, sharded in checkpoints).
    ``grad_scale`` multiplies their gradients: 1 gives the exact gradient of the sum of all
    workers' losses; data-parallel trainers that *average* the replicated gradients over W
    workers (fairseq, torch DDP) need 1/W, so that experts and replicated parameters are
    scaled alike. Returns the share."""
    world_size = dist.get_world_size(group)
    check_shardable(layer, world_size, name)
    if isinstance(layer.wrap_backend, ExpertParallel):
        return layer.experts
    first, end = expert_range(layer.experts.num_experts, dist.get_rank(group), world_size)
    layer.experts = layer.experts.shard(first, end)
    for p in layer.experts.parameters():
        p.expert = True
        p.moe_expert_shard = True
        if grad_scale != 1.0 and p.requires_grad:
            p.register_hook(_ScaleGrad(grad_scale))
    layer.wrap_backend = ExpertParallel(group)
    return layer.experts
