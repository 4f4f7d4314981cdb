"""Token dispatch: group gate assignments by expert, and add expert outputs back (paper §3).

No capacity limit and no dropped tokens: every assignment a gate makes is computed. The only
host synchronisation is one transfer of the per-expert counts, needed to know where each
expert's block of rows starts. Nothing here allocates a tokens × experts × anything tensor.

``gather_rows`` and ``combine`` are autograd Functions with hand-written backward passes:
the gather's backward is one ``index_add_`` into the input gradient (autograd's own backward
for ``x[rows]`` is an accumulating ``index_put_``, about twice as slow on CPU); the combine
weights and scatter-adds block by block (no S-row temporary), and in backward gathers the
output gradient once and uses it for both the expert outputs and the gates. Their large tensors come
from a ``Workspace`` when one is given (workspace.py).
"""

from typing import List, Optional, Tuple

import torch

from .autograd import first_order_only
from .workspace import Workspace


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


def _empty(workspace: Optional[Workspace], name, shape, like: torch.Tensor) -> torch.Tensor:
    if workspace is None:
        return like.new_empty(shape)
    return workspace.empty(name, shape, like.dtype, like.device)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, row_S, workspace, name):
        out_SD = _empty(workspace, name, (row_S.shape[0], x_TD.shape[1]), x_TD)
        torch.index_select(x_TD, 0, row_S, out=out_SD)
        ctx.save_for_backward(row_S)
        ctx.num_rows, ctx.workspace, ctx.name = x_TD.shape[0], workspace, name
        return out_SD

    @staticmethod
    @first_order_only
    def backward(ctx, grad_SD):
        (row_S,) = ctx.saved_tensors
        grad_TD = _empty(ctx.workspace, ctx.name + "_grad", (ctx.num_rows, grad_SD.shape[1]), grad_SD)
        grad_TD.zero_().index_add_(0, row_S, grad_SD)
        return grad_TD, None, None, None


def gather_rows(x_TD: torch.Tensor, row_S: torch.Tensor, workspace: Optional[Workspace] = None,
                name: str = "rows") -> torch.Tensor:
    """x_TD[row_S] (contiguous), with an ``index_add_`` backward."""
    x_TD = x_TD.contiguous()
    if not (torch.is_grad_enabled() and x_TD.requires_grad):
        out_SD = _empty(workspace, name, (row_S.shape[0], x_TD.shape[1]), x_TD)
        return torch.index_select(x_TD, 0, row_S, out=out_SD)
    return _GatherRows.apply(x_TD, row_S, workspace, name)


# Rows per block of the combine's elementwise passes: the block's temporary stays in cache and
# no S-row temporary is ever allocated.
_BLOCK_ROWS = 1024


def combine_rows(y_SO: torch.Tensor, row_S: torch.Tensor, gate_S: torch.Tensor, num_rows: int,
                 workspace: Optional[Workspace] = None) -> torch.Tensor:
    """The combine's forward without autograd: gate_S (already in y_SO's dtype) times each row,
    added into ``num_rows`` rows, block by block."""
    S, O = y_SO.shape
    y_TO = _empty(workspace, "y_TO", (num_rows, O), y_SO).zero_()
    block_BO = _empty(workspace, "block", (min(S, _BLOCK_ROWS), O), y_SO)
    for start in range(0, S, _BLOCK_ROWS):
        end = min(start + _BLOCK_ROWS, S)
        weighted = torch.mul(y_SO[start:end], gate_S[start:end, None], out=block_BO[: end - start])
        y_TO.index_add_(0, row_S[start:end], weighted)
    return y_TO


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_SO, row_S, gate_S, num_rows, workspace):
        gate_dtype, gate_S = gate_S.dtype, gate_S.to(y_SO.dtype)
        y_TO = combine_rows(y_SO, row_S, gate_S, num_rows, workspace)
        if ctx is not None:
            ctx.save_for_backward(y_SO, row_S, gate_S)
            ctx.workspace, ctx.gate_dtype = workspace, gate_dtype
        return y_TO

    @staticmethod
    @first_order_only
    def backward(ctx, grad_TO):
        y_SO, row_S, gate_S = ctx.saved_tensors
        ws = ctx.workspace
        S, O = y_SO.shape
        grad_TO = grad_TO.contiguous()
        # The output gradient of each assignment's row: gives both the gate's gradient
        # <grad_y[row], E_i(x)> and, times the gate, the expert output's gradient.
        grad_rows_SO = torch.index_select(grad_TO, 0, row_S,
                                          out=_empty(ws, "grad_rows_SO", (S, O), grad_TO))
        grad_gate_S = None
        if ctx.needs_input_grad[2]:
            grad_gate_S = grad_rows_SO.new_empty(S)
            block_BO = _empty(ws, "block", (min(S, _BLOCK_ROWS), O), y_SO)
            for start in range(0, S, _BLOCK_ROWS):
                end = min(start + _BLOCK_ROWS, S)
                product = torch.mul(grad_rows_SO[start:end], y_SO[start:end], out=block_BO[: end - start])
                torch.sum(product, 1, out=grad_gate_S[start:end])
            grad_gate_S = grad_gate_S.to(ctx.gate_dtype)
        grad_y_SO = grad_rows_SO.mul_(gate_S[:, None]) if ctx.needs_input_grad[0] else None
        return grad_y_SO, None, grad_gate_S, None, None


def combine(y_SO: torch.Tensor, row_S: torch.Tensor, gate_S: torch.Tensor, num_rows: int,
            workspace: Optional[Workspace] = None) -> torch.Tensor:
    """y_TO[t] = Σ_{s: row_S[s] = t} gate_S[s] · y_SO[s]: the Σ_i G(x)_i E_i(x) of eq. (1).

    Rows with no assignment (padding, or no expert under App. F thresholds) stay 0."""
    y_SO = y_SO.contiguous()
    if torch.is_grad_enabled() and (y_SO.requires_grad or gate_S.requires_grad):
        return _Combine.apply(y_SO, row_S, gate_S, num_rows, workspace)
    with torch.no_grad():
        return _Combine.forward(None, y_SO, row_S, gate_S, num_rows, workspace)
