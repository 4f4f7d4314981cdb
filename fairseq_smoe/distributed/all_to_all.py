"""Differentiable collectives for expert parallelism (paper §3.1).

    all_to_all(x, send_splits, recv_splits)   rows x[Σsend[:v] : Σsend[:v+1]] go to worker v;
                                              worker w's rows for us arrive in rank order
    sum_over_workers(t)                       Σ over workers, e.g. Importance and Load (§1.2)

Both work on any backend that implements ``all_to_all_single`` / ``all_reduce`` (NCCL on GPUs,
gloo on CPU). Their backward passes are collectives too, so every worker must run the same
forward and backward calls in the same order — which data-parallel training does.
"""

from typing import List, Optional

import torch
import torch.distributed as dist


class GroupRef:
    """A process group that ``copy.deepcopy`` (fairseq's EMA, model copies) passes by reference."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        self.group = group

    def __deepcopy__(self, memo):
        return self

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)


class _AllToAll(torch.autograd.Function):
    """Variable-size exchange of rows; backward sends the gradients back the way rows came."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _exchange(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad_out):
        return _exchange(grad_out, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


def _exchange(x, send_splits: List[int], recv_splits: List[int], group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=list(recv_splits),
                           input_split_sizes=list(send_splits), group=group)
    return out


def all_to_all(x: torch.Tensor, send_splits: List[int], recv_splits: List[int],
               group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Send ``send_splits[v]`` consecutive rows of ``x`` to worker v; receive ``recv_splits[w]``
    rows from worker w, concatenated in rank order. Differentiable in x."""
    if len(send_splits) != dist.get_world_size(group) or sum(send_splits) != x.shape[0]:
        raise ValueError(f"send_splits must have one entry per worker and add up to the "
                         f"{x.shape[0]} rows of x; got {list(send_splits)}")
    return _AllToAll.apply(x, tuple(send_splits), tuple(recv_splits), group)


def exchange_counts(counts_WE: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Row v of ``counts_WE`` goes to worker v; returns the rows received, row w from worker w.

    Used to tell each worker how many rows it will receive for each of its experts before the
    rows themselves move (sizes must be known to allocate the receive buffer)."""
    out = torch.empty_like(counts_WE)
    dist.all_to_all_single(out, counts_WE.contiguous(), group=group)
    return out


class _AllReduceSum(torch.autograd.Function):
    """y = Σ_workers x. Every worker's y depends on every worker's x, so the gradient of x is
    the sum over workers of the gradients of y: backward is an all-reduce too."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = grad_y.clone()
        dist.all_reduce(grad_x, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad_x, None


class SumOverWorkers:
    """``MoELayerBase.sum_over_workers`` for data-parallel training: per-expert totals summed
    over all workers before the CV² (§1.2), differentiably. Tensors that need no gradient
    (counts, hard loads) take a plain all-reduce.

    Only while gradients are enabled (training steps, which every worker runs in lockstep).
    Under ``torch.no_grad`` (validation, fairseq-eval-lm, fairseq-generate) totals stay per
    worker, so evaluation needs no collective when the experts are replicated; the smoe
    criteria still log CVs of the global batch, as they sum the vectors over workers."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        self.group_ref = GroupRef(group)

    def __deepcopy__(self, memo):
        return self

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return t
        group = self.group_ref.group
        if t.requires_grad:
            return _AllReduceSum.apply(t, group)
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    def __repr__(self) -> str:
        return "SumOverWorkers()"
