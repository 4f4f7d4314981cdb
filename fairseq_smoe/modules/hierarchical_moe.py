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

from .gating import NoisyTopKGate, SoftmaxGate, _counts, _per_expert_sum, build_gate
from .moe_layer import MoELayerBase, check_k, check_layer_args
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
        self.secondary_gates = nn.ModuleList(
            build_gate(gating, input_dim, experts_per_group, k_secondary, noise_epsilon)
            for _ in range(num_groups)
        )

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        x_TD, valid_T = self._flatten(x, padding_mask)
        a, b = self.num_groups, self.experts_per_group
        backend = self.experts_backend(x_TD)
        primary = self.primary_gate(x_TD, valid_T, resident=backend.resident)
        groups = backend.group(primary.expert_A, a)
        rows_P = primary.row_A.index_select(0, groups.order_S)
        primary_gate_P = primary.gate_A.index_select(0, groups.order_S)
        # X^(i) of every group in one gather: contiguous per-group blocks of P rows (one
        # index_add_ in backward instead of one full-size scatter per group).
        x_PD = backend.gather(x_TD, rows_P, self.workspace, "x_PD")
        rows_in_group_G = groups.counts_G
        if isinstance(self.secondary_gates[0], NoisyTopKGate):
            secondary = self._secondary_all_groups(backend, x_PD, groups)
        elif backend.resident and isinstance(self.secondary_gates[0], SoftmaxGate):
            secondary = self._secondary_softmax_all_groups(backend, x_PD, groups)
        else:  # batchwise: each group's m on the host (the counts, one read per step)
            group_counts = groups.counts if groups.counts is not None else groups.counts_G.tolist()
            secondary = self._secondary_group_by_group(x_PD, group_counts)
        row_A, expert_A, gate_A, load_ab, aux_loss = secondary

        # G_primary(x)_i · G_i(x)_j, and expert (i, j) at flat index i·b + j.
        gate_A = primary_gate_P[row_A] * gate_A
        importance = _per_expert_sum(expert_A, gate_A, a * b).reshape(a, b)
        counts = _counts(expert_A, a * b).reshape(a, b)
        load = primary.load_E[:, None] * load_ab / rows_in_group_G.clamp_min(1)[:, None]
        y_TO, row_S = self._experts_and_combine(backend, x_TD, rows_P[row_A], expert_A, gate_A)
        stats = self._stats(importance, load, counts, primary.aux_loss + aux_loss,
                            primary.num_rows, count_unrouted(row_S, valid_T, x_TD.shape[0]))
        return y_TO.reshape(*x.shape[:-1], self.output_dim), stats

    def _flat_experts(self, group_P, expert_PK):
        """Expert (i, j) at i·b + j; rows of the dropped tail to the sentinel num_experts."""
        expert_PK = group_P[:, None] * self.experts_per_group + expert_PK
        return torch.where(group_P[:, None] < self.num_groups, expert_PK, self.num_experts)

    def _secondary_logits(self, backend, x_PD, groups, weight_GDC):
        """Every group's rows times its own gate's weights: one grouped product, in fp32
        (inputs and weights cast for it, autocast off; float64 stays float64)."""
        dtype = torch.promote_types(torch.promote_types(x_PD.dtype, weight_GDC.dtype), torch.float32)
        with torch.autocast(x_PD.device.type, enabled=False):
            return backend.grouped_matmul(x_PD.to(dtype), groups, weight_GDC.to(dtype))

    def _secondary_all_groups(self, backend, x_PD, groups):
        """The (noisy) top-k secondary gates of all groups at once: their projections as one grouped
        product (each group's rows times its own gate's ``projection()``) and one top-k pass over
        all P rows, the load summed per group (smooth with noise, else the counts). Returns the
        assignments (row of x_PD, flat expert, secondary gate), the secondary loads [a, b] and
        the auxiliary loss (0)."""
        gates = self.secondary_gates
        # [W_g | W_noise] of every group, stacked: three operators whatever the number of groups
        weight_GDC = torch.stack([gate.w_gate for gate in gates])
        if gates[0].adds_noise:
            weight_GDC = torch.cat([weight_GDC, torch.stack([gate.w_noise for gate in gates])], dim=2)
        # No workspace: kept between steps, the logits and their input gradient ([P, d], freed
        # right after use) would add to the layer's resident memory (measured: MoE-1024-h's
        # activation peak 1.15 -> 1.24 x dense) for a few page faults saved.
        logits_PC = self._secondary_logits(backend, x_PD, groups, weight_GDC)
        if backend.resident:  # gates alike: one pass, the load per group from the device
            gate_PK, expert_PK, load_ab = gates[0].route(
                logits_PC, None, resident=True, segment_T=groups.group_S, num_segments=self.num_groups)
        else:
            gate_PK, expert_PK, load_ab = gates[0].route(logits_PC, None, groups.counts,
                                                         noise_rows=groups.num_assignments)
        group_P = groups.group_S  # num_groups for a dropped tail
        expert_A = self._flat_experts(group_P, expert_PK).reshape(-1)
        if load_ab is None:  # no noise: the load is the counts
            load_ab = _counts(expert_A, self.num_experts).reshape(self.num_groups, -1).to(gate_PK.dtype)
        row_A = torch.arange(x_PD.shape[0], device=x_PD.device).repeat_interleave(self.k_secondary)
        return row_A, expert_A, gate_PK.reshape(-1), load_ab, logits_PC.new_zeros(())

    def _secondary_softmax_all_groups(self, backend, x_PD, groups):
        """Dense softmax secondary gates of all groups at once (resident backends): every row of
        group i visits all b experts of group i; the load is the counts, as ``SoftmaxGate``'s."""
        b, P = self.experts_per_group, x_PD.shape[0]
        weight_GDB = torch.stack([gate.w_gate for gate in self.secondary_gates])
        gate_PB = torch.softmax(self._secondary_logits(backend, x_PD, groups, weight_GDB), dim=-1)
        expert_PB = torch.arange(b, device=x_PD.device).expand(P, b)
        expert_A = self._flat_experts(groups.group_S, expert_PB).reshape(-1)
        load_ab = _counts(expert_A, self.num_experts).reshape(self.num_groups, b).to(gate_PB.dtype)
        row_A = torch.arange(P, device=x_PD.device).repeat_interleave(b)
        return row_A, expert_A, gate_PB.reshape(-1), load_ab, gate_PB.new_zeros(())

    def _secondary_group_by_group(self, x_PD, group_counts):
        """Other gates (softmax, batchwise), one group at a time. An empty group still runs its
        gate on zero rows, so every parameter takes part in every step (DDP)."""
        rows, experts, gates, load, aux_loss = [], [], [], [], x_PD.new_zeros((), dtype=torch.float32)
        start = 0
        for group, x_GD in enumerate(torch.split(x_PD[: sum(group_counts)], group_counts)):
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
