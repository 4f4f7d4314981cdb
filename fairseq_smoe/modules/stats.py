"""What an MoE layer reports about one forward pass."""

from dataclasses import dataclass

import torch

from .balance import cv_squared


@dataclass
class MoEStats:
    """Balance statistics and the auxiliary loss of one MoE forward pass.

    Per-expert tensors are [num_experts] for a flat layer and [num_groups, experts_per_group]
    for a hierarchical one. Everything but ``loss`` is detached: diagnostics for logging.
    With expert parallelism the per-expert totals are summed over all workers (global batch).
    """

    loss: torch.Tensor  # scalar, differentiable: importance_loss + load_loss + threshold_loss
    importance: torch.Tensor  # Σ of gate values over non-pad tokens (eq. 6 / App. B)
    load: torch.Tensor  # smooth Load (train, noisy, k < n) or hard counts (eq. 10 / App. B)
    counts: torch.Tensor  # long: tokens actually sent to each expert
    importance_loss: torch.Tensor  # w_importance · CV(importance)², detached
    load_loss: torch.Tensor  # w_load · CV(load)², detached
    threshold_loss: torch.Tensor  # App. F L_batchwise (0 for other gates), detached
    num_tokens: torch.Tensor  # non-pad tokens seen by the gate (this worker's)
    unrouted: torch.Tensor  # non-pad tokens that reached no expert (App. F thresholds only)


def balance_losses(importance, load, w_importance: float, w_load: float):
    """(w_importance · CV(Importance)², w_load · CV(Load)²) of eq. (7) and (11)."""
    return w_importance * cv_squared(importance), w_load * cv_squared(load)


def count_unrouted(row_A: torch.Tensor, expert_A: torch.Tensor, num_experts: int, valid_T,
                   num_rows: int) -> torch.Tensor:
    """Real rows that no kept assignment points at (an assignment to the sentinel expert
    ``num_experts`` is dropped). Fixed shapes and no Python value written through an index:
    ``t[index] = True`` would copy that value to the device and wait for it on CUDA."""
    kept_A = (expert_A < num_experts).to(torch.int32)
    hits_T = torch.zeros(num_rows, dtype=torch.int32, device=row_A.device).index_add_(0, row_A, kept_A)
    unrouted_T = hits_T == 0
    if valid_T is not None:
        unrouted_T &= valid_T
    return unrouted_T.sum()
