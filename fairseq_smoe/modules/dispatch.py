"""Token dispatch: group gate assignments by expert, and add expert outputs back (PAPER.md §2).

No capacity limit and no dropped tokens: every assignment a gate makes is computed. The only
host synchronisation is one transfer of the per-expert counts, needed to know where each
expert's block of rows starts. Nothing here allocates a tokens × experts × anything tensor.
"""

from typing import List, Tuple

import torch


def group_by_expert(expert_A: torch.Tensor, num_experts: int) -> Tuple[torch.Tensor, List[int]]:
    """Order that sorts assignments by expert, and the number of assignments per expert.

    ``expert_A`` may contain the sentinel ``num_experts`` (padding, dropped): those sort last
    and are cut off. The sort is stable, so rows keep their order inside each expert.
    Returns (order_S into the A assignments, counts: Python list of E ints, Σ counts = S).
    """
    counts = torch.bincount(expert_A, minlength=num_experts + 1).tolist()  # the one host sync
    order_A = torch.argsort(expert_A, stable=True)
    kept = sum(counts[:num_experts])
    return order_A[:kept], counts[:num_experts]


def combine(y_SO: torch.Tensor, row_S: torch.Tensor, gate_S: torch.Tensor, num_rows: int) -> torch.Tensor:
    """y_TO[t] = Σ_{s: row_S[s] = t} gate_S[s] · y_SO[s]: the Σ_i G(x)_i E_i(x) of eq. (1).

    Rows with no assignment (padding, or no expert under App. F thresholds) stay 0."""
    weighted_SO = y_SO * gate_S.to(y_SO.dtype)[:, None]
    return y_SO.new_zeros(num_rows, y_SO.shape[1]).index_add(0, row_S, weighted_SO)
