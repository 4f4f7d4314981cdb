"""Hierarchical Mixture of Experts (paper App. B).

A primary gate picks k_primary of ``num_groups`` groups; inside group i a secondary gate G_i
picks k_secondary of its ``experts_per_group`` experts:

    y_H = Σ_i Σ_j G_primary(x)_i · G_i(x)_j · E_{i,j}(x)

Expert (i, j) is stored at flat index i·b + j. The secondary gate of group i sees only X^(i),
the examples whose primary gate for i is non-zero, so each example reaches
k_primary·k_secondary experts. Balance (App. B, one loss over all a·b cells):

    Importance_H(X)_{i,j} = Σ_x G_primary(x)_i · G_i(x)_j
    Load_H(X)_{i,j}       = Load_primary(X)_i · Load_i(X^(i))_j / |X^(i)|

The product form lets the load loss reach the primary gate. For "batchwise" gating each level
uses its own batchwise mask (m = k·|X|/n at that level) and threshold.
"""

from typing import Optional

import torch

from .gating import _counts, _per_expert_sum, build_gate
from .moe_layer import MoELayerBase, check_k, check_layer_args, run_gate
from .secondary_gates import SecondaryGates
from .stats import count_unrouted


class HierarchicalMoELayer(MoELayerBase):
    """Two-level MoE with ``num_groups`` × ``experts_per_group`` experts. Same forward and
    arguments as ``MoELayer``; ``stats`` tensors are shaped [num_groups, experts_per_group]."""

    def __init__(self, input_dim: int, output_dim: int, num_groups: int, experts_per_group: int,
                 hidden_dim: int, k_primary: int = 2, k_secondary: int = 2,
                 gating: str = "noisy_top_k", num_hidden_layers: int = 1,
                 noise_epsilon: float = 1e-2, w_importance: float = 0.1, w_load: float = 0.1,
                 recompute_activations: bool = False, backend: Optional[str] = None):
        check_layer_args(gating, noise_epsilon, w_importance, w_load, input_dim=input_dim,
                         output_dim=output_dim, num_groups=num_groups,
                         experts_per_group=experts_per_group, hidden_dim=hidden_dim,
                         num_hidden_layers=num_hidden_layers)
        check_k("k_primary", k_primary, num_groups, "num_groups")
        check_k("k_secondary", k_secondary, experts_per_group, "experts_per_group")
        super().__init__(input_dim, output_dim, num_groups * experts_per_group, hidden_dim,
                         num_hidden_layers, w_importance, w_load, recompute_activations, backend)
        self.num_groups, self.experts_per_group = num_groups, experts_per_group
        self.k_primary, self.k_secondary, self.gating = k_primary, k_secondary, gating
        self.primary_gate = build_gate(gating, input_dim, num_groups, k_primary, noise_epsilon)
        self.secondary_gates = SecondaryGates(gating, num_groups, input_dim, experts_per_group,
                                              k_secondary, noise_epsilon)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        x_TD, valid_T = self._flatten(x, padding_mask)
        a, b = self.num_groups, self.experts_per_group
        backend = self.experts_backend(x_TD)
        primary = run_gate(self.primary_gate, x_TD, valid_T, backend)
        groups = backend.group(primary.expert_A, a)
        rows_P = primary.row_A.index_select(0, groups.order_S)
        primary_gate_P = primary.gate_A.index_select(0, groups.order_S)
        # X^(i) of every group in one gather: contiguous per-group blocks of P rows (one
        # index_add_ in backward instead of one full-size scatter per group).
        x_PD = backend.gather(x_TD, rows_P, self.workspace, "x_PD")
        rows_in_group_G = groups.counts_G
        row_A, expert_A, gate_A, load_ab, aux_loss = self.secondary_gates(backend, x_PD, groups)

        # G_primary(x)_i · G_i(x)_j, and expert (i, j) at flat index i·b + j.
        gate_A = primary_gate_P[row_A] * gate_A
        importance = _per_expert_sum(expert_A, gate_A, a * b).reshape(a, b)
        counts = _counts(expert_A, a * b).reshape(a, b)
        load = primary.load_E[:, None] * load_ab / rows_in_group_G.clamp_min(1)[:, None]
        row_A = rows_P.index_select(0, row_A)
        y_TO = self._experts_and_combine(backend, x_TD, row_A, expert_A, gate_A)
        unrouted = count_unrouted(row_A, expert_A, a * b, valid_T, x_TD.shape[0])
        stats = self._stats(importance, load, counts, primary.aux_loss + aux_loss,
                            primary.num_rows, unrouted)
        return y_TO.reshape(*x.shape[:-1], self.output_dim), stats

    def extra_repr(self) -> str:
        return (f"gating={self.gating}, groups={self.num_groups}, "
                f"experts_per_group={self.experts_per_group}, "
                f"k_primary={self.k_primary}, k_secondary={self.k_secondary}")
