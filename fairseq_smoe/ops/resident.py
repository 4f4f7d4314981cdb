"""Device-resident routing shared by the ``grouped_mm`` and ``triton`` backends.

Everything stays on the device and every shape is fixed by the input, so nothing is read back
to the host and the number of kernels per step does not depend on the routing:

    group      stable argsort of the group index (the dropped sentinel G sorts last),
               rows per group by a scatter-add, their running sum as int32 offsets
    gather     one index_select (its backward one index_add)
    experts    one grouped product per expert layer (the backend's ``linear``), bias and ReLU;
               rows of the dropped tail come out as 0 and pass no gradient
    combine    gate-weighted rows added into their token by one index_add

The plain reference each backend's ``linear`` must equal is ``reference_linear`` (a Python loop
over the groups, host reads and all: for tests only).
"""

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from . import compute_dtype
from .grouping import Grouping


def group(key_A: torch.Tensor, num_groups: int) -> Grouping:
    """Sort A assignments by ``key_A`` (values 0..G, G = dropped), all on the device."""
    order_S = torch.argsort(key_A, stable=True)
    counts = torch.zeros(num_groups + 1, dtype=torch.long, device=key_A.device)
    counts.scatter_add_(0, key_A, torch.ones_like(key_A))
    counts_G = counts[:num_groups]
    offs_G = torch.cumsum(counts_G, 0, dtype=torch.int32)
    return Grouping(order_S, counts_G, num_groups, offs_G=offs_G,
                    key_S=key_A.index_select(0, order_S), num_assignments=key_A.shape[0])


def reference_linear(x_SD, grouping: Grouping, weight_GIO, bias_GO=None, relu=False):
    """What every backend's ``linear`` computes, as a loop over groups (reads the counts)."""
    y = x_SD.new_zeros(x_SD.shape[0], weight_GIO.shape[2])
    start = 0
    for g, count in enumerate(grouping.counts_G.tolist()):
        rows = slice(start, start + count)
        y[rows] = x_SD[rows] @ weight_GIO[g] + (0 if bias_GO is None else bias_GO[g])
        start += count
    return torch.relu(y) if relu else y


def _feed_forward(linear, grouping, x_SD, *params):
    # Parameters to the rows' dtype: a no-op, or under autocast the half copies of fp32 master
    # weights (differentiable: their gradients reach the weights in fp32; inside the recompute
    # checkpoint, so the copies are made again in backward rather than kept).
    params = [p.to(x_SD.dtype) for p in params]
    num_layers = len(params) // 2
    h = x_SD
    for layer in range(num_layers):
        h = linear(h, grouping, params[layer], params[num_layers + layer], layer < num_layers - 1)
    return h


class ResidentBackend:
    """Routing, gather, experts and combine on the device; subclasses give ``linear``."""

    resident = True
    name = "resident"

    def linear(self, x_SD: torch.Tensor, grouping: Grouping, weight_GIO: torch.Tensor,
               bias_GO: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
        raise NotImplementedError

    def group(self, key_A: torch.Tensor, num_groups: int) -> Grouping:
        return group(key_A, num_groups)

    def gather(self, x_TD, row_S, workspace=None, name=None):
        return x_TD.index_select(0, row_S)

    def grouped_matmul(self, x_SD, grouping: Grouping, weight_GIO):
        """Rows of group g times ``weight_GIO[g]`` (hierarchical secondary gate projections)."""
        return self.linear(x_SD, grouping, weight_GIO, None, False)

    def _feed_forward(self, experts, x_SD, grouping):
        """The experts' layers on rows already in the dtype they run in (autocast off)."""
        weights, biases = list(experts.weights), list(experts.biases)
        if experts.recompute_activations and torch.is_grad_enabled():  # App. D
            return checkpoint(_feed_forward, self.linear, grouping, x_SD, *weights, *biases,
                              use_reentrant=False)
        return _feed_forward(self.linear, grouping, x_SD, *weights, *biases)

    def combine(self, y_SO, row_S, gate_S, num_rows: int, workspace=None):
        """Σ_i G(x)_i E_i(x) (eq. 1): gate-weighted rows added into their row by one index_add."""
        weighted_SO = y_SO * gate_S.to(y_SO.dtype)[:, None]
        return weighted_SO.new_zeros(num_rows, y_SO.shape[1]).index_add(0, row_S, weighted_SO)

    def experts_and_combine(self, experts, x_TD, row_A, expert_A, gate_A, num_experts: int,
                            workspace=None):
        grouping = self.group(expert_A, num_experts)
        row_S = row_A.index_select(0, grouping.order_S)
        gate_S = gate_A.index_select(0, grouping.order_S)
        dtype = compute_dtype(experts.weights[0].dtype, x_TD.device.type)
        with torch.autocast(x_TD.device.type, enabled=False):  # our products choose their dtype
            x_SD = self.gather(x_TD, row_S).to(dtype)
            y_SO = self._feed_forward(experts, x_SD, grouping)
            y_TO = self.combine(y_SO, row_S, gate_S, x_TD.shape[0])
        return y_TO.to(x_TD.dtype)

    def feed_forward(self, experts, x_SD, counts, workspace=None):
        """The experts on rows grouped by expert with host ``counts`` (expert parallelism's local
        experts): copied to the device (no read), then the same grouped products."""
        counts_G = torch.tensor(counts, dtype=torch.long, device=x_SD.device)
        G = counts_G.shape[0]
        grouping = Grouping(torch.arange(x_SD.shape[0], device=x_SD.device), counts_G, G,
                            offs_G=torch.cumsum(counts_G, 0, dtype=torch.int32),
                            key_S=torch.arange(G, device=x_SD.device).repeat_interleave(
                                counts_G, output_size=x_SD.shape[0]),
                            num_assignments=x_SD.shape[0])
        dtype = compute_dtype(experts.weights[0].dtype, x_SD.device.type)
        with torch.autocast(x_SD.device.type, enabled=False):
            y_SO = self._feed_forward(experts, x_SD.to(dtype), grouping)
        return y_SO.to(x_SD.dtype)
