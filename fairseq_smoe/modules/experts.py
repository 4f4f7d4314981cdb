"""The experts E_1..E_n: ReLU feed-forward networks with separate weights (paper §2, §3).

Weights of all experts are stored stacked, ``weights[l]`` is [E, in_l, out_l], so expert e's
slice ``weights[l][e]`` is a contiguous view: no per-step copy, no gather of weights.

``forward(x_SD, counts)`` and ``forward_and_combine`` take rows already grouped by expert with
their counts on the host and run the ``loop`` backend (fairseq_smoe/ops/loop_experts.py: one
autograd Function over all experts, threads, reused buffers). The layers reach the other
backends (``grouped_mm``, ``triton``: device-resident counts) through ``fairseq_smoe.ops``,
which read these same parameters.
"""

import math
from typing import List

import torch
import torch.nn as nn

from ..ops.loop_experts import (
    GroupedFeedForwardOptions,
    _GroupedFeedForward,
    _GroupedFeedForwardCombine,
    grouped_matmul,  # noqa: F401  (re-exported: the loop's per-block product)
)
from ..ops.workspace import Workspace


class FeedForwardExperts(nn.Module):
    """``num_experts`` ReLU MLPs, input_dim → hidden_dim (× num_hidden_layers) → output_dim.

    ``forward(x_SD, counts)`` takes rows sorted by expert (``counts[e]`` rows for expert e, in
    order) and returns each row's expert output. Each expert is initialised like an
    ``nn.Linear`` stack (uniform ±1/sqrt(fan_in)).

    This module's own forward is the ``loop`` backend; a layer's ``backend`` argument chooses
    another (fairseq_smoe/ops).
    """

    def __init__(self, num_experts: int, input_dim: int, hidden_dim: int, output_dim: int,
                 num_hidden_layers: int = 1, recompute_activations: bool = False):
        super().__init__()
        self.num_experts = num_experts
        self.recompute_activations = recompute_activations
        dims = [input_dim] + [hidden_dim] * num_hidden_layers + [output_dim]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, d_in, d_out)) for d_in, d_out in zip(dims, dims[1:])
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, d_out)) for d_out in dims[1:]
        )
        for p in self.parameters():  # the expert is the leading dim (optimizers: smoe_adam)
            p.moe_expert_dim = 0
        # Reused large buffers between steps on CPU (workspace.py); not state, not copied.
        self.workspace = Workspace()
        self.reset_parameters()

    def reset_parameters(self):
        for w, b in zip(self.weights, self.biases):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    @property
    def output_dim(self) -> int:
        return self.weights[-1].shape[-1]

    def _check_counts(self, x_SD: torch.Tensor, counts: List[int]) -> None:
        if len(counts) != self.num_experts or sum(counts) != x_SD.shape[0]:
            raise ValueError(
                f"counts must list rows for each of the {self.num_experts} experts and add up to "
                f"{x_SD.shape[0]} rows; got {len(counts)} entries summing to {sum(counts)}"
            )

    def _inputs(self, x_SD: torch.Tensor, counts: List[int]):
        """Checked rows in the weights' dtype (e.g. fp32 master weights under autocast; outputs
        go back to x's dtype), and the Function's options."""
        self._check_counts(x_SD, counts)
        options = GroupedFeedForwardOptions(self.recompute_activations, getattr(self, "workspace", None))
        return x_SD.to(self.weights[0].dtype).contiguous(), options

    def forward(self, x_SD: torch.Tensor, counts: List[int]) -> torch.Tensor:
        rows_SD, options = self._inputs(x_SD, counts)
        y_SO = _GroupedFeedForward.apply(rows_SD, tuple(counts), options, *self.weights,
                                         *self.biases)
        return y_SO.to(x_SD.dtype)

    def forward_and_combine(self, x_SD: torch.Tensor, counts: List[int], row_S: torch.Tensor,
                            gate_S: torch.Tensor, num_rows: int, workspace=None) -> torch.Tensor:
        """Σ_i G(x)_i · E_i(x) (eq. 1): each row's expert output times ``gate_S``, added into row
        ``row_S`` of a [num_rows, output_dim] result. Same as ``dispatch.combine(self(x_SD,
        counts), row_S, gate_S, num_rows)``, in one Function (``workspace`` is not needed: the
        experts' own is used)."""
        rows_SD, options = self._inputs(x_SD, counts)
        y_TO = _GroupedFeedForwardCombine.apply(rows_SD, gate_S, row_S, num_rows, tuple(counts),
                                                options, *self.weights, *self.biases)
        return y_TO.to(x_SD.dtype)

    def extra_repr(self) -> str:
        dims = [self.weights[0].shape[1]] + [w.shape[2] for w in self.weights]
        return f"num_experts={self.num_experts}, dims={'→'.join(map(str, dims))}"
