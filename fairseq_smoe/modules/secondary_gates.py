"""The secondary gates G_1..G_a of a hierarchical MoE (paper App. B), all at once.

The gate of group i sees only X^(i), the rows its primary gate sent to group i, and picks among
that group's b experts. Each is one of the gates of gating.py; their weights are stored stacked
(W_g and W_noise [a, d, b], log T [a, b]) so that a training step handles every group with the
same few operators, whatever a: one grouped product for the projections of all groups, one
routing pass over all rows, the loads and L_batchwise summed per group by index. (Separate
parameters per group would each add operators of their own, their gradient bookkeeping.)
``group_gate(i)`` is group i's gate as a standalone module over views of these weights: the plain
reference the tests hold the stacked computation to.

Input rows ``x_PD`` are the rows of all groups in contiguous blocks, group 0 first (a grouping of
the primary assignments: ``grouping.group_S`` is each row's group, a for a dropped tail). The
result is the secondary assignments (row of x_PD, flat expert i·b + j, gate value G_i(x)_j), the
loads [a, b] (Load_i(X^(i))_j) and the auxiliary loss (Σ_i L_batchwise of group i, else 0).
"""

from typing import List, NamedTuple

import torch
import torch.nn as nn

from .gating import (
    TopKRouter,
    _counts,
    batchwise_capacity,
    batchwise_threshold_terms,
    build_gate,
    device_batchwise_capacity,
)


class SecondaryAssignments(NamedTuple):
    row_A: torch.Tensor  # long [A]: row of x_PD
    expert_A: torch.Tensor  # long [A]: flat expert i·b + j (a·b = dropped)
    gate_A: torch.Tensor  # float [A]: G_i(x)_j
    load_GJ: torch.Tensor  # float [a, b]: Load_i(X^(i))_j (smooth with noise, else counts)
    aux_loss: torch.Tensor  # scalar


class SecondaryGates(nn.Module):
    """The ``num_groups`` secondary gates of one ``gating`` mode, weights stacked by group."""

    def __init__(self, gating: str, num_groups: int, input_dim: int, experts_per_group: int,
                 k: int, noise_epsilon: float = 1e-2):
        super().__init__()
        self.gating, self.num_groups, self.k = gating, num_groups, k
        self.experts_per_group = experts_per_group
        self.noise_epsilon = noise_epsilon
        # Initialised as each group's own gate would be (App. A zeros; batchwise small random).
        gates = [build_gate(gating, input_dim, experts_per_group, k, noise_epsilon)
                 for _ in range(num_groups)]
        self.w_gate = nn.Parameter(torch.stack([gate.w_gate.detach() for gate in gates]))
        noisy = gating == "noisy_top_k"
        self.w_noise = nn.Parameter(torch.stack([gate.w_noise.detach() for gate in gates])) if noisy else None
        self.log_thresholds = nn.Parameter(torch.stack([gate.log_thresholds.detach() for gate in gates])) \
            if gating == "batchwise" else None
        self.router = TopKRouter(experts_per_group, k, noisy, noise_epsilon) \
            if gating in ("noisy_top_k", "top_k") else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the weights were stacked hold one gate per group
        # ("secondary_gates.{i}.w_gate", ...; T as "thresholds" before it was log T): stack them.
        for name in ("w_gate", "w_noise", "log_thresholds", "thresholds"):
            old_keys = [f"{prefix}{i}.{name}" for i in range(self.num_groups)]
            if all(key in state_dict for key in old_keys):
                stacked = torch.stack([state_dict.pop(key) for key in old_keys])
                if name == "thresholds":
                    name, stacked = "log_thresholds", stacked.clamp_min(1e-30).log()
                state_dict.setdefault(prefix + name, stacked)
                # Optimizer moments saved with such a state fit the old parameters, not these:
                # fairseq-train's resume checks this flag (compat.checkpoint_safety).
                self.converted_old_state = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def group_gate(self, group: int) -> nn.Module:
        """Group ``group``'s gate as a standalone module whose weights are views of the stacked
        ones (gradients reach them): the reference of ``forward``."""
        gate = build_gate(self.gating, self.w_gate.shape[1], self.experts_per_group, self.k,
                          self.noise_epsilon)
        for name in ("w_gate", "w_noise", "log_thresholds"):
            if getattr(self, name) is not None:
                delattr(gate, name)
                setattr(gate, name, getattr(self, name)[group])
        return gate.train(self.training)

    def forward(self, backend, x_PD: torch.Tensor, grouping) -> SecondaryAssignments:
        """``backend`` runs the grouped projections and the routing pass (fairseq_smoe/ops);
        ``grouping`` is the primary assignments' grouping of the rows of ``x_PD``."""
        if self.gating in ("noisy_top_k", "top_k"):
            return self._top_k(backend, x_PD, grouping)
        if self.gating == "softmax":
            return self._softmax(backend, x_PD, grouping)
        return self._batchwise(backend, x_PD, grouping)

    def _logits(self, backend, x_PD, grouping, weight_GDC):
        """Every group's rows times its own weights: one grouped product, in fp32 (inputs and
        weights cast for it, autocast off; float64 stays float64)."""
        dtype = torch.promote_types(torch.promote_types(x_PD.dtype, weight_GDC.dtype), torch.float32)
        with torch.autocast(x_PD.device.type, enabled=False):
            return backend.grouped_matmul(x_PD.to(dtype), grouping, weight_GDC.to(dtype))

    def _flat_experts(self, group_P, expert_PK):
        """Expert (i, j) at i·b + j; rows of the dropped tail to the sentinel a·b."""
        a, b = self.num_groups, self.experts_per_group
        return torch.where(group_P[:, None] < a, group_P[:, None] * b + expert_PK, a * b)

    def _top_k(self, backend, x_PD, grouping):
        """(Noisy) top-k: [W_g | W_noise] of all groups in one product, one top-k pass over all
        rows with the load summed per group (smooth with noise, else the counts)."""
        a, b, k = self.num_groups, self.experts_per_group, self.k
        router = self.router
        weight_GDC = torch.cat([self.w_gate, self.w_noise], dim=2) if router.adds_noise else self.w_gate
        # No workspace: kept between steps, the logits and their input gradient ([P, d], freed
        # right after use) would add to the layer's resident memory (measured: MoE-1024-h's
        # activation peak 1.15 -> 1.24 x dense) for a few page faults saved.
        logits_PC = self._logits(backend, x_PD, grouping, weight_GDC)
        gate_PK, expert_PK, load_GJ = router.route(logits_PC, None, backend, grouping)
        expert_A = self._flat_experts(grouping.group_S, expert_PK).reshape(-1)
        if load_GJ is None:  # no noise: the load is the counts
            load_GJ = _counts(expert_A, a * b).reshape(a, b).to(gate_PK.dtype)
        row_A = torch.arange(x_PD.shape[0], device=x_PD.device).repeat_interleave(k)
        return SecondaryAssignments(row_A, expert_A, gate_PK.reshape(-1), load_GJ,
                                    logits_PC.new_zeros(()))

    def _softmax(self, backend, x_PD, grouping):
        """Dense softmax: every row of group i visits all b experts of group i; the load is the
        counts, as ``SoftmaxGate``'s."""
        a, b, P = self.num_groups, self.experts_per_group, x_PD.shape[0]
        gate_PJ = torch.softmax(self._logits(backend, x_PD, grouping, self.w_gate), dim=-1)
        expert_PJ = torch.arange(b, device=x_PD.device).expand(P, b)
        expert_A = self._flat_experts(grouping.group_S, expert_PJ).reshape(-1)
        load_GJ = _counts(expert_A, a * b).reshape(a, b).to(gate_PJ.dtype)
        row_A = torch.arange(P, device=x_PD.device).repeat_interleave(b)
        return SecondaryAssignments(row_A, expert_A, gate_PJ.reshape(-1), load_GJ, gate_PJ.new_zeros(()))

    def _batchwise(self, backend, x_PD, grouping):
        """Strictly balanced gating (App. F) inside each group: in training expert j of group i
        takes the m_i rows of X^(i) with the highest G_i,σ (m_i = k·|X^(i)|/b), in eval the
        rows above its threshold T_ij. On the loop backend, whose grouping has the counts on
        the host, all groups at once on a [a, max |X^(i)|, b] padded copy of the probabilities;
        on the resident ones by one segmented sort whose shapes P fixes."""
        a, b = self.num_groups, self.experts_per_group
        device = x_PD.device
        group_P = grouping.group_S  # a for the dropped tail
        real_P = group_P < a
        probs_PJ = torch.softmax(self._logits(backend, x_PD, grouping, self.w_gate), dim=-1)
        thresholds_GJ = self.log_thresholds.exp().to(probs_PJ.dtype)
        thresholds_PJ = thresholds_GJ.index_select(0, group_P.clamp_max(a - 1))
        mask_threshold_PJ = (probs_PJ > thresholds_PJ) & real_P[:, None]
        counts_G = grouping.counts_G
        kept_A = None
        if self.training:
            if grouping.counts is None:  # device-resident: fixed shapes, nothing read back
                mask_PJ, row_A, j_A, kept_A = self._batchwise_masks_resident(probs_PJ, group_P, counts_G)
            else:
                mask_PJ, row_A, j_A = self._batchwise_masks(probs_PJ, group_P, counts_G,
                                                            grouping.counts)
            terms_PJ = batchwise_threshold_terms(probs_PJ, thresholds_PJ, mask_threshold_PJ,
                                                 mask_PJ) * real_P[:, None]
            per_group = torch.zeros(a + 1, dtype=terms_PJ.dtype, device=device).index_add_(
                0, group_P, terms_PJ.sum(1))[:a]
            aux_loss = (per_group / counts_G.clamp_min(1)).sum()  # each group averaged over its rows
        else:
            mask_PJ = mask_threshold_PJ
            row_A, j_A = mask_PJ.nonzero(as_tuple=True)
            aux_loss = probs_PJ.new_zeros(())
        masked_PJ = probs_PJ * mask_PJ
        # A row with no expert has an all-zero numerator: its gates stay 0 (no NaN).
        gate_PJ = masked_PJ / masked_PJ.sum(-1, keepdim=True).clamp_min(1e-30)
        load_GJ = torch.zeros(a + 1, b, dtype=probs_PJ.dtype, device=device).index_add_(
            0, group_P, mask_PJ.to(probs_PJ.dtype))[:a]
        expert_A = group_P.index_select(0, row_A) * b + j_A
        gate_A = gate_PJ[row_A, j_A]
        if kept_A is not None:  # the padded tail of the resident assignments is dropped
            expert_A = torch.where(kept_A, expert_A, a * b)
            gate_A = gate_A * kept_A
        return SecondaryAssignments(row_A, expert_A, gate_A, load_GJ, aux_loss)

    def _batchwise_masks(self, probs_PJ, group_P, counts_G, counts: List[int]):
        """M_batchwise of every group (App. F, eq. 16) and its assignments (row, expert within
        the group), the assignments ordered by group, then rank, then expert."""
        a, b, P = self.num_groups, self.experts_per_group, probs_PJ.shape[0]
        device = probs_PJ.device
        # m_i = round(k·|X^(i)|/b), at least 1 and at most |X^(i)| (gating.batchwise_capacity),
        # on the host for the shapes and on the device for the masks.
        capacity = [batchwise_capacity(self.k, c, b) for c in counts]
        m_G = device_batchwise_capacity(self.k, counts_G, b)
        most_rows, most_m = max(counts, default=0), max(capacity, default=0)
        mask_PJ = torch.zeros(P + 1, b, dtype=torch.bool, device=device)  # row P: a sink
        if most_m == 0:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return mask_PJ[:P], empty, empty
        # Row p of group i sits at position p - start_i of its group's block.
        start_G = torch.cumsum(counts_G, 0) - counts_G
        position_P = torch.arange(P, device=device) - start_G.index_select(0, group_P.clamp_max(a - 1))
        # Slots: group i's rows at i·max_rows + position; each dropped-tail row past them all,
        # at a·max_rows + p (unused, but distinct: index_copy_ needs no duplicate index).
        slot_P = torch.where(group_P < a, group_P * most_rows + position_P.clamp(0, most_rows - 1),
                             a * most_rows + torch.arange(P, device=device))
        scores_UJ = torch.full((a * most_rows + P, b), -1.0, dtype=probs_PJ.dtype, device=device)
        scores_UJ.index_copy_(0, slot_P, probs_PJ)
        top_GMJ = scores_UJ[: a * most_rows].reshape(a, most_rows, b).topk(most_m, dim=1).indices
        rank_M = torch.arange(most_m, device=device)
        kept_GMJ = (rank_M[None, :, None] < m_G[:, None, None]).expand(a, most_m, b)
        row_GMJ = start_G[:, None, None] + top_GMJ
        expert_GMJ = torch.arange(b, device=device).expand(a, most_m, b)
        # Ranks past m_i (and positions past a group's rows) go to the sink row.
        mask_PJ.index_put_((torch.where(kept_GMJ, row_GMJ, P), expert_GMJ),
                           torch.ones((), dtype=torch.bool, device=device))
        # The kept entries, in order, without reading their number back (it is Σ m_i·b).
        kept = torch.argsort((~kept_GMJ).reshape(-1).to(torch.uint8), stable=True)[: b * sum(capacity)]
        row_A = row_GMJ.reshape(-1).index_select(0, kept)
        return mask_PJ[:P], row_A, expert_GMJ.reshape(-1).index_select(0, kept)

    def _batchwise_masks_resident(self, probs_PJ, group_P, counts_G):
        """M_batchwise of every group (App. F, eq. 16) from the device counts alone: every shape
        is fixed by P, so nothing is read back. One segmented sort of the P·b (row, expert)
        pairs: by score, then (stably) by segment (group i, expert j); a pair's rank in its
        segment is its position less the segment's start, and it is kept when that rank is
        below m_i. Returns (mask [P, b], row [A], expert within the group [A], kept [A]) with
        A = min(P·b, k·P + a·b) ≥ Σ_i m_i·b (m_i ≤ k·|X^(i)|/b + 1): the kept pairs first,
        ordered by group, expert and rank, then dropped padding."""
        a, b, P = self.num_groups, self.experts_per_group, probs_PJ.shape[0]
        device = probs_PJ.device
        m_G = device_batchwise_capacity(self.k, counts_G, b)
        pair_Q = torch.arange(P * b, device=device)  # pair q = row q // b, expert q % b
        real_P = group_P < a
        segment_Q = torch.where(real_P[:, None], group_P[:, None] * b + torch.arange(b, device=device),
                                a * b).reshape(-1)  # a·b: the dropped tail, sorted last
        by_score_Q = torch.argsort(probs_PJ.reshape(-1), descending=True, stable=True)
        order_Q = by_score_Q.index_select(0, torch.argsort(segment_Q.index_select(0, by_score_Q),
                                                            stable=True))
        segment_sorted_Q = segment_Q.index_select(0, order_Q)
        # Segment (i, j) starts at b·start_i + j·|X^(i)| in that order.
        start_G = torch.cumsum(counts_G, 0) - counts_G
        segment_start_S = torch.cat([(b * start_G[:, None] + torch.arange(b, device=device)
                                      * counts_G[:, None]).reshape(-1),
                                     (b * counts_G.sum()).reshape(1)])
        rank_Q = pair_Q - segment_start_S.index_select(0, segment_sorted_Q)
        m_S = torch.cat([m_G.repeat_interleave(b, output_size=a * b), m_G.new_zeros(1)])
        kept_Q = rank_Q < m_S.index_select(0, segment_sorted_Q)
        mask_PJ = torch.zeros(P * b, dtype=torch.bool, device=device).scatter_(
            0, order_Q, kept_Q).reshape(P, b)
        A = min(P * b, self.k * P + a * b)
        first_A = torch.argsort((~kept_Q).to(torch.uint8), stable=True)[:A]
        pair_A = order_Q.index_select(0, first_A)
        return mask_PJ, pair_A // b, pair_A % b, kept_Q.index_select(0, first_A)

    def extra_repr(self) -> str:
        return (f"gating={self.gating}, groups={self.num_groups}, "
                f"experts_per_group={self.experts_per_group}, k={self.k}")

