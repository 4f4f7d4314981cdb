"""Encoder-decoder attention of the translation models (paper App. G).

Two score functions A(x_i, y_j) between a decoder query x_i and an encoder output y_j:

    separable (App. G):  A(x, y) = Σ_d V_d · tanh((x·U)_d) · tanh((y·W)_d)
    additive (GNMT):     A(x, y) = Σ_d V_d · tanh((x·U)_d + (y·W)_d)

The separable form factorises, so the scores of all target and source positions are one
batched matrix product: (tanh(X·U) ⊙ V) · tanh(Y·W)ᵀ. The additive form needs a
[B, T, S, A] tensor. Weights over the source are softmax(A) over the non-padding positions,
and the context is the weighted sum of the encoder outputs (the values).

Pure PyTorch. The key side (``project_keys``) depends only on the encoder output, so a
decoder that runs one time step at a time computes it once per sentence and reuses it.
"""

from typing import Optional, Tuple

import torch
import torch.nn as nn

ATTENTION_TYPES = ("separable", "additive")


class EncoderDecoderAttention(nn.Module):
    """Attention from decoder queries [B, T, Dq] over encoder outputs [B, S, Dk].

    Args:
        query_dim: Dq (decoder state size).
        key_dim: Dk (encoder output size; the context has this size too).
        attention_dim: d, the size of the U, W projections and of V.
        attention_type: "separable" (App. G) or "additive" (GNMT).
    """

    def __init__(self, query_dim: int, key_dim: int, attention_dim: int,
                 attention_type: str = "separable"):
        super().__init__()
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type must be one of {', '.join(ATTENTION_TYPES)}; "
                             f"got {attention_type!r}")
        for name, value in (("query_dim", query_dim), ("key_dim", key_dim),
                            ("attention_dim", attention_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        self.attention_type = attention_type
        self.query_proj = nn.Linear(query_dim, attention_dim, bias=False)  # U
        self.key_proj = nn.Linear(key_dim, attention_dim, bias=False)  # W
        self.v = nn.Parameter(torch.empty(attention_dim))  # V
        nn.init.normal_(self.v, std=attention_dim**-0.5)

    def project_keys(self, keys_BSK: torch.Tensor) -> torch.Tensor:
        """The query-independent part: tanh(Y·W) (separable) or Y·W (additive), [B, S, d]."""
        projected_BSA = self.key_proj(keys_BSK)
        return torch.tanh(projected_BSA) if self.attention_type == "separable" else projected_BSA

    def scores(self, query_BTQ: torch.Tensor, projected_keys_BSA: torch.Tensor) -> torch.Tensor:
        """A(x_t, y_s) for every query and source position: [B, T, S]."""
        query_BTA = self.query_proj(query_BTQ)
        if self.attention_type == "separable":
            return torch.bmm(torch.tanh(query_BTA) * self.v, projected_keys_BSA.transpose(1, 2))
        hidden_BTSA = torch.tanh(query_BTA.unsqueeze(2) + projected_keys_BSA.unsqueeze(1))
        return hidden_BTSA @ self.v

    def forward(self, query_BTQ: torch.Tensor, values_BSK: torch.Tensor,
                key_padding_mask_BS: Optional[torch.Tensor] = None,
                projected_keys_BSA: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (context [B, T, Dk], attention weights [B, T, S]).

        ``key_padding_mask_BS`` is True at source padding, which gets weight 0.
        ``projected_keys_BSA``: ``project_keys(values_BSK)`` if already computed."""
        if projected_keys_BSA is None:
            projected_keys_BSA = self.project_keys(values_BSK)
        scores_BTS = self.scores(query_BTQ, projected_keys_BSA).float()
        if key_padding_mask_BS is not None:
            scores_BTS = scores_BTS.masked_fill(key_padding_mask_BS.unsqueeze(1), float("-inf"))
        weights_BTS = torch.softmax(scores_BTS, dim=-1).to(values_BSK.dtype)
        return torch.bmm(weights_BTS, values_BSK), weights_BTS

    def extra_repr(self) -> str:
        return f"attention_type={self.attention_type}"
