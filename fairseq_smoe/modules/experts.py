"""The experts E_1..E_n: ReLU feed-forward networks with separate weights (paper §2, §3).

Weights of all experts are stored stacked, ``weights[l]`` is [E, in_l, out_l], so expert e's
slice ``weights[l][e]`` is a contiguous view: no per-step copy, no gather of weights.

This module holds the parameters, their initialisation and a plain reference forward. How the
experts run in a layer is its expert backend's business (fairseq_smoe/ops: ``loop``,
``grouped_mm``, ``triton``), which reads these parameters.
"""

import math
from typing import List, Optional, Sequence

import torch
import torch.nn as nn


class FeedForwardExperts(nn.Module):
    """``num_experts`` ReLU MLPs, input_dim → hidden_dim (× num_hidden_layers) → output_dim.

    Each expert is initialised like an ``nn.Linear`` stack (uniform ±1/sqrt(fan_in)).
    ``recompute_activations`` asks the backends to recompute the hidden activations in backward
    (App. D).

    The module may hold a share of a larger set (expert parallelism, ``shard``): experts
    ``first_expert`` .. ``first_expert + num_experts - 1`` of ``num_experts_total``. Its
    state-dict keys are those of the full set, its tensors the share; loading a state dict of
    the full set takes the share.
    """

    def __init__(self, num_experts: int, input_dim: int, hidden_dim: int, output_dim: int,
                 num_hidden_layers: int = 1, recompute_activations: bool = False):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * num_hidden_layers + [output_dim]
        self._hold([torch.empty(num_experts, d_in, d_out) for d_in, d_out in zip(dims, dims[1:])],
                   [torch.empty(num_experts, d_out) for d_out in dims[1:]], recompute_activations)
        self.reset_parameters()

    def _hold(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
              recompute_activations: bool, first_expert: int = 0,
              num_experts_total: Optional[int] = None) -> None:
        self.num_experts = weights[0].shape[0]
        self.recompute_activations = recompute_activations
        self.first_expert = first_expert
        self.num_experts_total = self.num_experts if num_experts_total is None else num_experts_total
        self.weights = nn.ParameterList(nn.Parameter(w) for w in weights)
        self.biases = nn.ParameterList(nn.Parameter(b) for b in biases)
        for p in self.parameters():  # the expert is the leading dim (optimizers: smoe_adam)
            p.moe_expert_dim = 0

    def reset_parameters(self):
        for w, b in zip(self.weights, self.biases):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def shard(self, first: int, end: int) -> "FeedForwardExperts":
        """Experts [first, end) as a module of their own, holding copies of those slices (no
        new initialisation: the random generator does not move)."""
        if not 0 <= first < end <= self.num_experts:
            raise ValueError(f"cannot take experts [{first}, {end}) of {self.num_experts}")
        shard = FeedForwardExperts.__new__(FeedForwardExperts)
        nn.Module.__init__(shard)
        with torch.no_grad():
            shard._hold([w[first:end].clone() for w in self.weights],
                        [b[first:end].clone() for b in self.biases], self.recompute_activations,
                        self.first_expert + first, self.num_experts_total)
        for mine, full in zip(shard.parameters(), self.parameters()):
            mine.requires_grad_(full.requires_grad)
        return shard.train(self.training)

    @property
    def output_dim(self) -> int:
        return self.weights[-1].shape[-1]

    def forward(self, x_SD: torch.Tensor, counts: List[int]) -> torch.Tensor:
        """The reference: rows sorted by expert (``counts[e]`` rows for expert e, in order), each
        expert's block through its layers, one expert after the other. The layers do not run
        this (their backend runs the experts); tests and readers do."""
        if len(counts) != self.num_experts or sum(counts) != x_SD.shape[0]:
            raise ValueError(
                f"counts must list rows for each of the {self.num_experts} experts and add up to "
                f"{x_SD.shape[0]} rows; got {len(counts)} entries summing to {sum(counts)}")
        last = len(self.weights) - 1
        outputs = []
        for expert, rows in enumerate(torch.split(x_SD, list(counts))):
            h = rows
            for layer, (w, b) in enumerate(zip(self.weights, self.biases)):
                h = h @ w[expert] + b[expert]
                if layer < last:
                    h = torch.relu(h)
            outputs.append(h)
        return torch.cat(outputs) if outputs else x_SD.new_zeros(0, self.output_dim)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A share of the experts given a state dict of all of them (an unsharded or merged
        # checkpoint): keep this share's slice.
        first, end = self.first_expert, self.first_expert + self.num_experts
        if self.num_experts != self.num_experts_total:
            for name, _ in self.named_parameters():
                tensor = state_dict.get(prefix + name)
                if (torch.is_tensor(tensor) and tensor.dim() >= 1
                        and tensor.shape[0] == self.num_experts_total):
                    state_dict[prefix + name] = tensor[first:end]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        dims = [self.weights[0].shape[1]] + [w.shape[2] for w in self.weights]
        which = f"num_experts={self.num_experts}"
        if self.num_experts != self.num_experts_total:
            last = self.first_expert + self.num_experts - 1
            which = f"experts {self.first_expert}..{last} of {self.num_experts_total}"
        return f"{which}, dims={'→'.join(map(str, dims))}"
