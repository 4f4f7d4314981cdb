"""Experts sharded across data-parallel workers (paper §3.1).

Gates, embeddings and LSTMs stay replicated; each of W workers holds experts
[r·E/W, (r+1)·E/W) of every MoE layer. A layer's forward groups its assignments by (global)
expert as usual and hands them to ``ExpertParallelExperts.forward(x_SD, counts)``:

    1. counts → per-worker row counts: rows for experts owned by worker v are contiguous
    2. all-to-all of the counts, so every worker knows how many rows it will receive
    3. all-to-all of the rows; received rows are grouped (source worker, expert) and are
       reordered to (expert, source worker) so each local expert runs once on its block
    4. the local experts run; outputs go back the same way (reverse all-to-all)

Every expert therefore sees the examples of all workers: its batch is k·b·W/E instead of
k·b/E (§3.1). No capacity limit, nothing dropped. The exchanges are differentiable, so an
expert's weight gradient collects the contributions of every worker's tokens: it must not be
all-reduced. Hierarchical layers shard whole groups (their experts are stored group-major).
"""

from typing import Optional, Tuple

import torch
from torch import distributed as dist

from ..modules.experts import FeedForwardExperts
from ..modules.hierarchical_moe import HierarchicalMoELayer
from ..ops.loop_dispatch import combine
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


class ExpertParallelExperts(FeedForwardExperts):
    """This worker's share of a ``FeedForwardExperts``, with the ``forward(x_SD, counts)``
    contract of the full set: ``counts`` lists rows for all ``num_experts_total`` experts.

    Built from the full (identically initialised on every worker) experts by taking this
    worker's slice, so W workers together hold exactly the experts one process would.
    State-dict keys are those of ``FeedForwardExperts``; tensors hold the local slice. Loading
    a full (unsharded) state dict takes this worker's slice. The local experts run through
    ``FeedForwardExperts.forward`` itself.

    Args:
        experts: the full experts (all ``num_experts``), identical on every worker.
        group: the data-parallel process group (None: the default group).
        grad_scale: factor on the expert weight gradients. 1 gives the exact gradient of the
            sum of all workers' losses. Data-parallel trainers that *average* the replicated
            gradients over W workers (fairseq, torch DDP) need 1/W, so that experts and
            replicated parameters are scaled alike.
    """

    def __init__(self, experts: FeedForwardExperts, group: Optional[dist.ProcessGroup] = None,
                 grad_scale: float = 1.0):
        group_ref = GroupRef(group)
        world_size, rank = group_ref.world_size, group_ref.rank
        total = experts.num_experts
        if total % world_size:
            raise ValueError(f"{world_size} workers cannot hold equal shares of {total} experts")
        first, end = expert_range(total, rank, world_size)
        weights = list(experts.weights)
        with torch.random.fork_rng(devices=[]):  # the throw-away init must not move the RNG
            super().__init__(end - first, weights[0].shape[1], weights[0].shape[2],
                             weights[-1].shape[2], num_hidden_layers=len(weights) - 1,
                             recompute_activations=experts.recompute_activations)
        self.to(device=weights[0].device, dtype=weights[0].dtype)
        self.group_ref = group_ref
        self.num_experts_total, self.first_expert = total, first
        self.world_size, self.rank = world_size, rank
        self.grad_scale = grad_scale
        with torch.no_grad():
            for mine, full in zip([*self.weights, *self.biases], [*experts.weights, *experts.biases]):
                mine.copy_(full[first:end])
                mine.requires_grad_(full.requires_grad)
        for p in self.parameters():
            # fairseq's convention for parameters that differ between workers: its legacy DDP
            # does not all-reduce them; our clip_grad_norm_ counts each of them once.
            p.expert = True
            p.moe_expert_shard = True
            if grad_scale != 1.0 and p.requires_grad:
                p.register_hook(_ScaleGrad(grad_scale))

    def forward(self, x_SD: torch.Tensor, counts) -> torch.Tensor:
        """``counts``: a list (rows for each of the E experts, adding up to x_SD's rows), or a
        tensor of them on the device (the device-resident backends: x_SD may then end with a
        dropped tail of rows beyond the counts, left behind)."""
        E, W, El = self.num_experts_total, self.world_size, self.num_experts
        group = self.group_ref.group
        if torch.is_tensor(counts):
            # 1. the counts go to their workers on the device; what this worker sends and
            # receives comes back to the host in one read (the all-to-all needs the sizes)
            counts_WE = counts.to(torch.long).reshape(W, El)
            received_WE = exchange_counts(counts_WE, group)
            sizes = torch.cat([counts_WE.reshape(-1), received_WE.reshape(-1)]).tolist()
            counts = sizes[:E]
            received = [sizes[E + w * El:E + (w + 1) * El] for w in range(W)]
            if sum(counts) > x_SD.shape[0]:
                raise ValueError(f"counts add up to {sum(counts)} rows; x has {x_SD.shape[0]}")
            x_SD = x_SD[:sum(counts)]
        else:
            if len(counts) != E or sum(counts) != x_SD.shape[0]:
                raise ValueError(f"counts must list rows for each of the {E} experts and add up to "
                                 f"{x_SD.shape[0]} rows; got {len(counts)} entries summing to "
                                 f"{sum(counts)}")
            counts = [int(c) for c in counts]
            # 1. how many rows each worker sends to each of our experts (one host sync)
            counts_WE = torch.tensor(counts, dtype=torch.long, device=x_SD.device).view(W, El)
            received_WE = exchange_counts(counts_WE, group)
            received = received_WE.tolist()
        send_splits = [sum(counts[v * El:(v + 1) * El]) for v in range(W)]
        recv_splits = [sum(row) for row in received]
        local_counts = [sum(received[w][e] for w in range(W)) for e in range(El)]
        # 2. rows to their experts' workers
        x_RD = all_to_all(x_SD, send_splits, recv_splits, group)
        # 3. (source worker, expert) blocks → (expert, source worker) blocks
        order_R = self._expert_major_order(received_WE, sum(recv_splits))
        x_LD = x_RD if order_R is None else x_RD[order_R]
        y_LO = self._run_local_experts(x_LD, local_counts)
        if order_R is None:
            y_RO = y_LO
        else:
            inverse_R = torch.empty_like(order_R)
            inverse_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
            y_RO = y_LO[inverse_R]
        # 4. outputs back to the workers the rows came from
        return all_to_all(y_RO, recv_splits, send_splits, group)

    def forward_and_combine(self, x_SD, counts, row_S, gate_S, num_rows, workspace=None):
        # Rows travel to other workers between the gather and the experts: the fused Function of
        # the single-process experts does not apply, combine the returned rows here (a dropped
        # tail of a device-resident grouping was left behind: only the kept rows come back).
        y_SO = self(x_SD, counts)
        kept = y_SO.shape[0]
        return combine(y_SO, row_S[:kept], gate_S[:kept], num_rows, workspace)

    def _expert_major_order(self, received_WE: torch.Tensor, num_rows: int):
        W, El = received_WE.shape
        if El == 1 or W == 1:
            return None  # already grouped by expert
        block_B = torch.arange(W * El, device=received_WE.device)
        block_R = torch.repeat_interleave(block_B, received_WE.reshape(-1), output_size=num_rows)
        key_R = (block_R % El) * W + block_R // El
        return torch.argsort(key_R, stable=True)

    def _run_local_experts(self, x_LD: torch.Tensor, local_counts) -> torch.Tensor:
        backend = getattr(self, "local_backend", None)  # set by a device-resident backend
        if backend is not None:
            return backend.feed_forward_counts(self, x_LD, local_counts)
        return super().forward(x_LD, local_counts)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A full (unsharded or merged) checkpoint: keep this worker's slice.
        first, end = self.first_expert, self.first_expert + self.num_experts
        for name, _ in self.named_parameters():
            key = prefix + name
            tensor = state_dict.get(key)
            if (torch.is_tensor(tensor) and tensor.dim() >= 1
                    and tensor.shape[0] == self.num_experts_total != self.num_experts):
                state_dict[key] = tensor[first:end]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        dims = [self.weights[0].shape[1]] + [w.shape[2] for w in self.weights]
        last = self.first_expert + self.num_experts - 1
        return (f"experts {self.first_expert}..{last} of {self.num_experts_total} on worker "
                f"{self.rank} of {self.world_size}, dims={'→'.join(map(str, dims))}")


def shard_layer(layer, group: Optional[dist.ProcessGroup] = None, grad_scale: float = 1.0,
                name: str = "") -> ExpertParallelExperts:
    """Replace ``layer.experts`` by this worker's share (``ExpertParallelExperts``)."""
    world_size = dist.get_world_size(group)
    check_shardable(layer, world_size, name)
    if isinstance(layer.experts, ExpertParallelExperts):
        return layer.experts
    layer.experts = ExpertParallelExperts(layer.experts, group, grad_scale)
    return layer.experts
