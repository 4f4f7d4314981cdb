"""Hierarchical Mixture of Experts (PAPER.md §1.3; paper App. B).

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
import torch.nn as nn

from .dispatch import gather_rows, group_by_expert
from .gating import _per_expert_sum, build_gate
from .moe_layer import MoELayerBase, check_k, check_layer_args
from .stats import count_unrouted


class HierarchicalMoELayer(MoELayerBase):
    """Two-level MoE with ``num_groups`` × ``experts_per_group`` experts. Same forward and
    arguments as ``MoELayer``; ``stats`` tensors are shaped [num_groups, experts_per_group]."""

    def __init__(self, input_dim: int, output_dim: int, num_groups: int, experts_per_group: int,
                 hidden_dim: int, k_primary: int = 2, k_secondary: int = 2,
                 gating: str = "noisy_top_k", num_hidden_layers: int = 1,
                 noise_epsilon: float = 1e-2, w_importance: float = 0.1, w_load: float = 0.1,
                 recompute_activations: bool = False):
        check_layer_args(gating, noise_epsilon, w_importance, w_load, input_dim=input_dim,
                         output_dim=output_dim, num_groups=num_groups,
                         experts_per_group=experts_per_group, hidden_dim=hidden_dim,
                         num_hidden_layers=num_hidden_layers)
        check_k("k_primary", k_primary, num_groups, "num_groups")
        check_k("k_secondary", k_secondary, experts_per_group, "experts_per_group")
        super().__init__(input_dim, output_dim, num_groups * experts_per_group, hidden_dim,
                         num_hidden_layers, w_importance, w_load, recompute_activations)
        self.num_groups, self.experts_per_group = num_groups, experts_per_group
        self.k_primary, self.k_secondary, self.gating = k_primary, k_secondary, gating
        self.primary_gate = build_gate(gating, input_dim, num_groups, k_primary, noise_epsilon)
        self.secondary_gates = nn.ModuleList(
            build_gate(gating, input_dim, experts_per_group, k_secondary, noise_epsilon)
            for _ in range(num_groups)
        )

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        x_TD, valid_T = self._flatten(x, padding_mask)
        a, b = self.num_groups, self.experts_per_group
        primary = self.primary_gate(x_TD, valid_T)
        order_P, group_counts = group_by_expert(primary.expert_A, a)
        rows_P, primary_gate_P = primary.row_A[order_P], primary.gate_A[order_P]
        # X^(i) of every group in one gather, cut into contiguous per-group blocks (one
        # index_add_ in backward instead of one full-size scatter per group).
        x_groups = torch.split(gather_rows(x_TD, rows_P, self.workspace, "x_PD"), group_counts)

        rows, experts, gates, importance, load, counts = [], [], [], [], [], []
        aux_loss = primary.aux_loss
        start = 0
        for group, group_rows in enumerate(group_counts):
            # X^(i): the rows whose primary gate for this group is non-zero. An empty group still
            # runs its gate on zero rows, so every parameter takes part in every step (DDP).
            rows_G = rows_P[start : start + group_rows]
            primary_gate_G = primary_gate_P[start : start + group_rows]
            start += group_rows
            secondary = self.secondary_gates[group](x_groups[group])
            gate_A = primary_gate_G[secondary.row_A] * secondary.gate_A
            rows.append(rows_G[secondary.row_A])
            experts.append(group * b + secondary.expert_A)
            gates.append(gate_A)
            importance.append(_per_expert_sum(secondary.expert_A, gate_A, b))
            load.append(primary.load_E[group] * secondary.load_E / max(group_rows, 1))
            counts.append(secondary.counts_E)
            aux_loss = aux_loss + secondary.aux_loss

        y_TO, row_S = self._experts_and_combine(x_TD, torch.cat(rows), torch.cat(experts),
                                                torch.cat(gates))
        stats = self._stats(torch.stack(importance), torch.stack(load), torch.stack(counts),
                            aux_loss, primary.num_rows,
                            count_unrouted(row_S, valid_T, x_TD.shape[0]))
        return y_TO.reshape(*x.shape[:-1], self.output_dim), stats

    def extra_repr(self) -> str:
        return (f"gating={self.gating}, groups={self.num_groups}, "
                f"experts_per_group={self.experts_per_group}, "
                f"k_primary={self.k_primary}, k_secondary={self.k_secondary}")
