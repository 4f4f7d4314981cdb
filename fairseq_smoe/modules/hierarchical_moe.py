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
from .experts import grouped_matmul
from .gating import NoisyTopKGate, _at_least_fp32, _counts, _per_expert_sum, build_gate
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
        # X^(i) of every group in one gather: contiguous per-group blocks of P rows (one
        # index_add_ in backward instead of one full-size scatter per group).
        x_PD = gather_rows(x_TD, rows_P, self.workspace, "x_PD")
        rows_in_group_G = torch.tensor(group_counts, device=x_PD.device)
        if isinstance(self.secondary_gates[0], NoisyTopKGate):
            secondary = self._secondary_all_groups(x_PD, group_counts, rows_in_group_G)
        else:
            secondary = self._secondary_group_by_group(x_PD, group_counts)
        row_A, expert_A, gate_A, load_ab, aux_loss = secondary

        # G_primary(x)_i · G_i(x)_j, and expert (i, j) at flat index i·b + j.
        gate_A = primary_gate_P[row_A] * gate_A
        importance = _per_expert_sum(expert_A, gate_A, a * b).reshape(a, b)
        counts = _counts(expert_A, a * b).reshape(a, b)
        load = primary.load_E[:, None] * load_ab / rows_in_group_G.clamp_min(1)[:, None]
        y_TO, row_S = self._experts_and_combine(x_TD, rows_P[row_A], expert_A, gate_A)
        stats = self._stats(importance, load, counts, primary.aux_loss + aux_loss,
                            primary.num_rows, count_unrouted(row_S, valid_T, x_TD.shape[0]))
        return y_TO.reshape(*x.shape[:-1], self.output_dim), stats

    def _secondary_all_groups(self, x_PD, group_counts, rows_in_group_G):
        """The (noisy) top-k secondary gates of all groups at once: their projections as one grouped
        product (each group's rows times its own gate's ``projection()``) and one top-k pass over
        all P rows, the load summed per group (smooth with noise, else the counts). Returns the
        assignments (row of x_PD, flat expert, secondary gate), the secondary loads [a, b] and
        the auxiliary loss (0)."""
        gates, b = self.secondary_gates, self.experts_per_group
        weight_GDC = torch.stack([gate.projection() for gate in gates])
        # No workspace: kept between steps, the logits and their input gradient ([P, d], freed
        # right after use) would add to the layer's resident memory (measured: MoE-1024-h's
        # activation peak 1.15 -> 1.24 x dense) for a few page faults saved.
        logits_PC = _at_least_fp32(grouped_matmul(x_PD, group_counts, weight_GDC))
        gate_PK, expert_PK, load_ab = gates[0].route(logits_PC, None, group_counts)  # gates alike
        group_P = torch.arange(self.num_groups, device=x_PD.device).repeat_interleave(
            rows_in_group_G, output_size=x_PD.shape[0])
        expert_A = (group_P[:, None] * b + expert_PK).reshape(-1)
        if load_ab is None:  # no noise: the load is the counts
            load_ab = _counts(expert_A, self.num_experts).reshape(self.num_groups, b).to(gate_PK.dtype)
        row_A = torch.arange(x_PD.shape[0], device=x_PD.device).repeat_interleave(self.k_secondary)
        return row_A, expert_A, gate_PK.reshape(-1), load_ab, logits_PC.new_zeros(())

    def _secondary_group_by_group(self, x_PD, group_counts):
        """Other gates (softmax, batchwise), one group at a time. An empty group still runs its
        gate on zero rows, so every parameter takes part in every step (DDP)."""
        rows, experts, gates, load, aux_loss = [], [], [], [], x_PD.new_zeros((), dtype=torch.float32)
        start = 0
        for group, x_GD in enumerate(torch.split(x_PD, group_counts)):
            secondary = self.secondary_gates[group](x_GD)
            rows.append(start + secondary.row_A)
            experts.append(group * self.experts_per_group + secondary.expert_A)
            gates.append(secondary.gate_A)
            load.append(secondary.load_E)
            aux_loss = aux_loss + secondary.aux_loss
            start += x_GD.shape[0]
        return torch.cat(rows), torch.cat(experts), torch.cat(gates), torch.stack(load), aux_loss

    def extra_repr(self) -> str:
        return (f"gating={self.gating}, groups={self.num_groups}, "
                f"experts_per_group={self.experts_per_group}, "
                f"k_primary={self.k_primary}, k_secondary={self.k_secondary}")
