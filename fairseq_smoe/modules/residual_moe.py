"""The MoE layer as the paper's models wire it (App. C, §5.3): sigmoid on the MoE output,
dropout, then the layer's input added back (residual)."""

from typing import Optional

import torch
import torch.nn as nn


class ResidualMoE(nn.Module):
    """x + dropout(sigmoid(MoE(x))) at every non-padding position; padding passes unchanged.

    Wraps a ``MoELayer`` or ``HierarchicalMoELayer`` whose input and output sizes are equal.
    Returns (output, MoEStats).
    """

    def __init__(self, moe: nn.Module, dropout: float = 0.0):
        super().__init__()
        if moe.input_dim != moe.output_dim:
            raise ValueError(f"a residual MoE needs input_dim == output_dim; got "
                             f"{moe.input_dim} and {moe.output_dim}")
        self.moe = moe
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        y, stats = self.moe(x, padding_mask)
        y = self.dropout(torch.sigmoid(y))
        if padding_mask is not None:
            y = y.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        return x + y, stats
