"""Gating networks G(x) of the Sparsely-Gated MoE layer (paper §2.1, §4 and App. A, App. F).

A gate looks at a batch of rows x_TD and decides which experts each row visits and with what
weight. It returns a sparse list of (row, expert, gate value) *assignments* plus the balance
statistics of that decision; it never touches the experts. The layer (``moe_layer.py``) hands
the assignments to its expert backend (fairseq_smoe/ops), which groups them by expert, runs the
experts and adds up the gate-weighted outputs.

Gating modes (``build_gate``):
    ``noisy_top_k``  §2.1: H(x) = x·W_g + N(0,1)·softplus(x·W_noise); G = softmax(KeepTopK(H, k)).
    ``top_k``        the same without noise (train and eval alike).
    ``softmax``      G_σ(x) = softmax(x·W_g) over all experts: the dense, non-sparse baseline.
    ``batchwise``    App. F strictly balanced gating: in training every expert takes exactly the
                     m rows of the batch with its highest G_σ; in eval a learned per-expert
                     threshold T decides instead.

Choices the paper leaves open (documented in the README too):
    * Noise std is ``softplus(x·W_noise) + noise_epsilon`` as in the authors' reference code.
    * Batchwise m = round(k·|X| / n), at least 1 and at most |X| (|X| = non-padding rows), so
      the batch makes about k·|X| assignments and every expert trains on every batch.
    * L_batchwise is averaged over rows (so its scale does not grow with the batch), has
      weight 1, and its gradient reaches only the thresholds T (G_σ is detached in it): its
      purpose is to teach T the training masks, not to move the gate. T is parametrised as log T
      so that its updates are relative and it can follow confident (saturated) gates.
    * A row that passes no threshold in eval gets no expert: its MoE output is 0 and the
      residual connection of the surrounding model carries it. The layer counts such rows
      in ``MoEStats.unrouted`` so it is never silent.
"""

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import noisy_topk
from ..ops.workspace import Workspace

GATING_MODES = ("noisy_top_k", "top_k", "softmax", "batchwise")


class GateOutput(NamedTuple):
    """What a gate decided for a batch of T rows and E experts.

    Assignments are flat vectors of length A (A = T·k for top-k gates). A row that is padding
    has its assignments pointed at the sentinel expert E, with gate 0: dispatch drops them.

    A named tuple, not a dataclass: torch's (non-full) module backward hooks, which fairseq's
    NanDetector registers when a gradient turns NaN/Inf, index a module's output with ``[0]``
    until they reach a tensor.
    """

    row_A: torch.Tensor  # long [A]: input row of each assignment
    expert_A: torch.Tensor  # long [A]: expert of each assignment (E = dropped)
    gate_A: torch.Tensor  # float [A]: G(x)_i, differentiable
    importance_E: torch.Tensor  # float [E]: Σ_x G(x)_i over real rows, differentiable (eq. 6)
    load_E: torch.Tensor  # float [E]: smooth Load (eq. 10) or hard counts
    counts_E: torch.Tensor  # long [E]: rows actually sent to each expert
    aux_loss: torch.Tensor  # scalar: L_batchwise (App. F) or 0
    num_rows: object  # real (non-padding) rows |X|: int, or a 0-dim tensor with padding


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Gate math runs in float32 for half-precision inputs (softmax, Φ), float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def project(x_TD: torch.Tensor, weight_DE: torch.Tensor) -> torch.Tensor:
    """x·W for a gate, in float32 (float64 stays float64) whatever the input's precision and
    under autocast too: inputs and weights are cast for this small product, so near-tied logits
    are not reordered by half-precision rounding before the top-k."""
    dtype = torch.promote_types(torch.promote_types(x_TD.dtype, weight_DE.dtype), torch.float32)
    with torch.autocast(x_TD.device.type, enabled=False):
        return x_TD.to(dtype) @ weight_DE.to(dtype)


def _num_real_rows(valid_T: Optional[torch.Tensor], num_rows: int):
    """|X|: an int, or a 0-dim tensor on the device with padding (not read back)."""
    return num_rows if valid_T is None else valid_T.sum()


def _per_expert_sum(expert_A: torch.Tensor, values_A: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Σ of values per expert; the sentinel expert (padding) lands in a dropped extra slot."""
    totals = values_A.new_zeros(num_experts + 1).index_add(0, expert_A, values_A)
    return totals[:num_experts]


def _counts(expert_A: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert (a scatter-add: ``bincount`` reads its size back on CUDA)."""
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=expert_A.device)
    return counts.scatter_add_(0, expert_A, torch.ones_like(expert_A))[:num_experts]


class TopKRouter(nn.Module):
    """The routing of noisy top-k gating (§2.1, eq. 3-5; plain top-k when ``noisy`` is False)
    from logits already projected: H(x), KeepTopK, the softmax over the kept k and the smooth
    load. No parameters: ``NoisyTopKGate`` adds W_g and W_noise, the hierarchical layer's
    ``SecondaryGates`` the stacked weights of all its groups. Noise is drawn only when
    ``self.training``."""

    def __init__(self, num_experts: int, k: int, noisy: bool = True, noise_epsilon: float = 1e-2):
        super().__init__()
        self.num_experts, self.k, self.noisy = num_experts, k, noisy
        self.noise_epsilon = noise_epsilon
        # Reused noise and logit-gradient buffers between steps on CPU (workspace.py); not state.
        self.workspace = Workspace()

    @property
    def adds_noise(self) -> bool:
        return self.training and self.noisy

    def route(self, logits_T2E: torch.Tensor, valid_T: Optional[torch.Tensor] = None,
              backend=None, segments=None):
        """G(x) from the projected logits x·[W_g | W_noise] (x·W_g without noise; see
        ``NoisyTopKGate.projection``): (gate_TK, expert_TK, smooth load,
        or None where the load is the counts: no noise, or k = n). With ``segments`` (a
        ``Grouping`` of the rows, e.g. a hierarchical layer's X^(i)) the rows are separate
        batches and the smooth load is [G, E]. ``backend`` (the layer's expert backend, None:
        the loop's way) decides how the fused pass runs (ops/noisy_topk.py)."""
        E, k = self.num_experts, self.k
        if self.adds_noise:
            clean_TE = logits_T2E[:, :E]
            noise_rows = clean_TE.shape[0] if segments is None else segments.num_assignments
            if noise_rows > clean_TE.shape[0]:
                # The loop backend's grouping keeps only assigned rows: draw for every
                # assignment and keep the first, the same noise as a resident backend, which
                # keeps a dropped tail of rows.
                clean_TE = torch.cat([clean_TE, clean_TE.new_zeros(noise_rows - clean_TE.shape[0], E)])
            noise_TE = self.draw_noise(clean_TE)[: logits_T2E.shape[0]]
            if k < E:
                # H(x), KeepTopK, softmax and the smooth load in one fused pass.
                return noisy_topk.route(logits_T2E, noise_TE, valid_T, k, self.noise_epsilon,
                                        self.workspace, backend, segments)
            noise_std_TE = F.softplus(logits_T2E[:, E:]) + self.noise_epsilon  # eq. (4)
            noisy_TE = torch.addcmul(logits_T2E[:, :E], noise_TE, noise_std_TE)
        else:
            noisy_TE = logits_T2E  # no noise: H(x) = x·W_g
        top_values_TK, expert_TK = noisy_TE.topk(k, dim=-1)  # KeepTopK (eq. 5)
        return torch.softmax(top_values_TK, dim=-1), expert_TK, None  # softmax over the kept k

    def draw_noise(self, clean_TE: torch.Tensor) -> torch.Tensor:
        """N(0, 1) noise shaped like the clean logits (noisy_topk.gate_noise)."""
        return noisy_topk.gate_noise(clean_TE.shape[0], clean_TE.shape[1], clean_TE.dtype,
                                     clean_TE.device, self.workspace)


class NoisyTopKGate(TopKRouter):
    """Noisy top-k gating (§2.1, eq. 3-5), and plain top-k when ``noisy`` is False.

    W_g and W_noise start at zero (App. A), so at initialisation every expert is equally
    likely and the noise alone decides.
    """

    def __init__(self, input_dim: int, num_experts: int, k: int, noisy: bool = True,
                 noise_epsilon: float = 1e-2):
        super().__init__(num_experts, k, noisy, noise_epsilon)
        self.w_gate = nn.Parameter(torch.zeros(input_dim, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(input_dim, num_experts)) if noisy else None

    def forward(self, x_TD: torch.Tensor, valid_T: Optional[torch.Tensor] = None,
                backend=None) -> GateOutput:
        """``backend``: the layer's expert backend, which decides how the fused routing pass
        runs (ops/noisy_topk.py); None runs it the loop's way."""
        E, k = self.num_experts, self.k
        T = x_TD.shape[0]
        logits_T2E = project(x_TD, self.projection())
        gate_TK, expert_TK, load_E = self.route(logits_T2E, valid_T, backend)
        if valid_T is not None:
            expert_TK = torch.where(valid_T[:, None], expert_TK, E)
            gate_TK = gate_TK * valid_T[:, None]

        expert_A, gate_A = expert_TK.reshape(-1), gate_TK.reshape(-1)
        counts_E = _counts(expert_A, E)
        if load_E is None:
            load_E = counts_E.to(logits_T2E.dtype)  # deterministic without noise or with k = n
        return GateOutput(
            row_A=torch.arange(T, device=x_TD.device).repeat_interleave(k),
            expert_A=expert_A,
            gate_A=gate_A,
            importance_E=_per_expert_sum(expert_A, gate_A, E),
            load_E=load_E,
            counts_E=counts_E,
            aux_loss=logits_T2E.new_zeros(()),
            num_rows=_num_real_rows(valid_T, T),
        )

    def projection(self) -> torch.Tensor:
        """The weights the gate multiplies x by: [W_g | W_noise] (one matmul for both
        projections) when it adds noise, else W_g."""
        if self.adds_noise:
            return torch.cat([self.w_gate, self.w_noise], dim=1)
        return self.w_gate


class SoftmaxGate(nn.Module):
    """Dense softmax gating G_σ(x) = softmax(x·W_g) (§2.1): every row visits every expert."""

    def __init__(self, input_dim: int, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.w_gate = nn.Parameter(torch.zeros(input_dim, num_experts))

    def forward(self, x_TD: torch.Tensor, valid_T: Optional[torch.Tensor] = None) -> GateOutput:
        E, T = self.num_experts, x_TD.shape[0]
        gate_TE = torch.softmax(project(x_TD, self.w_gate), dim=-1)
        expert_TE = torch.arange(E, device=x_TD.device).expand(T, E)
        if valid_T is not None:
            gate_TE = gate_TE * valid_T[:, None]
            expert_TE = torch.where(valid_T[:, None], expert_TE, E)
        expert_A, gate_A = expert_TE.reshape(-1), gate_TE.reshape(-1)
        counts_E = _counts(expert_A, E)
        return GateOutput(
            row_A=torch.arange(T, device=x_TD.device).repeat_interleave(E),
            expert_A=expert_A,
            gate_A=gate_A,
            importance_E=gate_TE.sum(0),
            load_E=counts_E.float(),
            counts_E=counts_E,
            aux_loss=gate_TE.new_zeros(()),
            num_rows=_num_real_rows(valid_T, T),
        )


def batchwise_capacity(k: int, num_rows: int, num_experts: int) -> int:
    """m = k·|X|/n of App. F, rounded to nearest, at least 1 and at most |X|."""
    if num_rows == 0:
        return 0
    return min(num_rows, max(1, int(k * num_rows / num_experts + 0.5)))


def device_batchwise_capacity(k: int, num_rows, num_experts: int):
    """``batchwise_capacity`` of row counts that may be a device tensor (|X| with padding,
    |X^(i)| per group): the same rounding, elementwise on the device (an int stays an int)."""
    if not isinstance(num_rows, torch.Tensor):
        return batchwise_capacity(k, num_rows, num_experts)
    rows = num_rows.long()
    # round(k·|X|/n) with halves up, as int(x + 0.5) for x ≥ 0: ⌊(2k·|X| + n) / 2n⌋.
    return torch.minimum(rows, ((2 * k * rows + num_experts) // (2 * num_experts)).clamp_min(1))


def batchwise_mask(probs_TE: torch.Tensor, m: int, valid_T: Optional[torch.Tensor] = None,
                   keep=None):
    """M_batchwise(X, m) (App. F, eq. 16): per expert (column), the m rows with the largest
    G_σ. Returns (mask [T, E] bool, chosen rows [m, E]). ``keep`` (≤ m; an int or a 0-dim
    device tensor) keeps only the first ``keep`` of each column's m ranks in the mask: the
    rows stay listed, ranked, so the shapes do not depend on it."""
    scores_TE = probs_TE if valid_T is None else probs_TE.masked_fill(~valid_T[:, None], -1.0)
    rows_mE = scores_TE.topk(m, dim=0).indices
    if keep is None:
        kept_mE = torch.ones((), dtype=torch.bool, device=probs_TE.device).expand(rows_mE.shape)
    else:
        kept_mE = (torch.arange(m, device=probs_TE.device) < keep)[:, None].expand(rows_mE.shape)
    mask_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(0, rows_mE, kept_mE)
    return mask_TE, rows_mE


def threshold_mask(probs_TE: torch.Tensor, thresholds_E: torch.Tensor) -> torch.Tensor:
    """M_threshold(x, T) (App. F, eq. 17): expert i is used iff G_σ(x)_i > T_i."""
    return probs_TE > thresholds_E


def batchwise_threshold_terms(probs_TE, thresholds_E, mask_threshold_TE, mask_batchwise_TE):
    """The terms (M_threshold − M_batchwise)_{j,i} (G_σ(x_j)_i − T_i) of L_batchwise (App. F,
    eq. 18), [T, E]. Every term is ≥ 0 and vanishes where the masks agree. G_σ is detached,
    so the gradient reaches only T (see module docstring)."""
    disagreement_TE = mask_threshold_TE.to(probs_TE.dtype) - mask_batchwise_TE.to(probs_TE.dtype)
    return disagreement_TE * (probs_TE.detach() - thresholds_E)


def batchwise_threshold_loss(probs_TE, thresholds_E, mask_threshold_TE, mask_batchwise_TE,
                             valid_T=None) -> torch.Tensor:
    """L_batchwise (App. F, eq. 18) averaged over real rows: Σ_j Σ_i of the terms above."""
    terms_TE = batchwise_threshold_terms(probs_TE, thresholds_E, mask_threshold_TE, mask_batchwise_TE)
    if valid_T is not None:
        terms_TE = terms_TE * valid_T[:, None]
    num_rows = max(terms_TE.shape[0], 1) if valid_T is None else valid_T.sum().clamp_min(1)
    return terms_TE.sum() / num_rows


class BatchwiseGate(nn.Module):
    """Strictly balanced gating (App. F).

        G(x)_i = G_σ(x)_i · M_i / Σ_j G_σ(x)_j · M_j

    Training uses M_batchwise (every expert gets exactly m rows of the batch); eval uses
    M_threshold with the learned ``thresholds`` T (stored as ``log_thresholds``), trained by
    L_batchwise. The number of
    experts a row visits varies (0 to n).
    """

    def __init__(self, input_dim: int, num_experts: int, k: int):
        super().__init__()
        self.num_experts, self.k = num_experts, k
        # Not zero-initialised, unlike the noisy gate: with all G_σ tied, every column's top m
        # would be the same m rows and the rest of the batch would reach no expert. A small
        # random W_g keeps G_σ near uniform but gives each expert a different ordering.
        self.w_gate = nn.Parameter(torch.randn(input_dim, num_experts) * (0.1 / input_dim**0.5))
        # T is learned as log T: an optimizer step then changes T by a factor, not by an amount,
        # so T can follow gates of any scale (a confident gate's training masks can cut at
        # probabilities around 1e-4, which an additive step of Adam's size cannot reach).
        # At initialisation G_σ ≈ 1/n everywhere; L_batchwise moves T from there.
        self.log_thresholds = nn.Parameter(torch.full((num_experts,), -math.log(num_experts)))

    @property
    def thresholds(self) -> torch.Tensor:
        """T of App. F (eq. 17), per expert."""
        return self.log_thresholds.exp()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before T was stored as log T hold "thresholds": convert them.
        old_key = prefix + "thresholds"
        if old_key in state_dict and prefix + "log_thresholds" not in state_dict:
            state_dict[prefix + "log_thresholds"] = state_dict.pop(old_key).clamp_min(1e-30).log()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x_TD: torch.Tensor, valid_T: Optional[torch.Tensor] = None) -> GateOutput:
        E, T = self.num_experts, x_TD.shape[0]
        probs_TE = torch.softmax(project(x_TD, self.w_gate), dim=-1)  # G_σ(x)
        thresholds_E = _at_least_fp32(self.thresholds)
        mask_threshold_TE = threshold_mask(probs_TE, thresholds_E)
        if valid_T is not None:
            mask_threshold_TE = mask_threshold_TE & valid_T[:, None]
        num_rows = _num_real_rows(valid_T, T)

        if self.training:
            # Shapes come from T alone: every expert ranks its best m_T = m(T) rows, and keeps
            # the first m(|X|) ≤ m_T of them (m of the real rows, on the device), so nothing is
            # read back. The ranks past m(|X|) go to the sentinel expert E (dropped).
            m_T = batchwise_capacity(self.k, T, E)
            m_1 = device_batchwise_capacity(self.k, num_rows, E)
            mask_TE, rows_mE = batchwise_mask(probs_TE, m_T, valid_T, m_1)
            aux_loss = batchwise_threshold_loss(probs_TE, thresholds_E, mask_threshold_TE,
                                                mask_TE, valid_T)
            # Column-major: the assignments come out already grouped by expert.
            row_A = rows_mE.t().reshape(-1)
            kept_A = (torch.arange(m_T, device=x_TD.device) < m_1).repeat(E)
            expert_A = torch.where(kept_A, torch.arange(E, device=x_TD.device).repeat_interleave(m_T), E)
        else:
            mask_TE = mask_threshold_TE
            aux_loss = probs_TE.new_zeros(())
            row_A, expert_A = mask_TE.nonzero(as_tuple=True)

        masked_TE = probs_TE * mask_TE
        # A row with no expert has an all-zero numerator: its gates stay 0 (no NaN).
        gate_TE = masked_TE / masked_TE.sum(-1, keepdim=True).clamp_min(1e-30)
        counts_E = mask_TE.sum(0)
        # Dropped assignments (expert E) read column 0 and get gate 0.
        gate_A = gate_TE[row_A, expert_A.clamp_max(E - 1)] * (expert_A < E)
        return GateOutput(
            row_A=row_A,
            expert_A=expert_A,
            gate_A=gate_A,
            importance_E=gate_TE.sum(0),
            load_E=counts_E.float(),
            counts_E=counts_E,
            aux_loss=aux_loss,
            num_rows=num_rows,
        )


def build_gate(gating: str, input_dim: int, num_experts: int, k: int,
               noise_epsilon: float = 1e-2) -> nn.Module:
    """The gate for one of ``GATING_MODES`` (arguments are validated by the layers)."""
    if gating == "noisy_top_k":
        return NoisyTopKGate(input_dim, num_experts, k, noisy=True, noise_epsilon=noise_epsilon)
    if gating == "top_k":
        return NoisyTopKGate(input_dim, num_experts, k, noisy=False)
    if gating == "softmax":
        return SoftmaxGate(input_dim, num_experts)
    if gating == "batchwise":
        return BatchwiseGate(input_dim, num_experts, k)
    raise ValueError(f"gating must be one of {', '.join(GATING_MODES)}; got {gating!r}")
