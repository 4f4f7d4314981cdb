"""The experts E_1..E_n: ReLU feed-forward networks with separate weights (PAPER.md §1, §3).

Weights of all experts are stored stacked, ``weights[l]`` is [E, in_l, out_l], so expert e's
slice ``weights[l][e]`` is a contiguous view: no per-step copy, no gather of weights.

The forward and backward run as one autograd Function over tokens already grouped by expert
(``dispatch.group_by_expert``): each expert runs once on its contiguous block of rows, and in
backward its weight gradient is written straight into its slice of one preallocated gradient
tensor. Indexing the stacked weight inside a Python loop under autograd instead makes every
expert's backward allocate and add a full-size zero gradient (O(E²) memory traffic); this is
why the loop lives inside a Function. Experts with no rows cost nothing but zeroing their
gradient slice.

``recompute_activations`` (App. D) keeps only each expert's input and recomputes its hidden
activations in backward, trading one more forward matmul for the hidden-layer memory.
"""

import math
from typing import List, Sequence

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable


def _segments(counts: Sequence[int]):
    """(expert, start, end) for each expert with at least one row."""
    start = 0
    for expert, count in enumerate(counts):
        if count:
            yield expert, start, start + count
        start += count


def _expert_forward(x_rows, weights, biases, expert, hidden_out=None, y_out=None):
    """Run one expert on its rows. ``hidden_out[l]`` (optional) receives the post-ReLU
    activation of hidden layer l, ``y_out`` (optional) the output. Returns the output rows."""
    h = x_rows
    last = len(weights) - 1
    for layer, (w, b) in enumerate(zip(weights, biases)):
        out = y_out if layer == last else (hidden_out[layer] if hidden_out is not None else None)
        h = torch.addmm(b[expert], h, w[expert]) if out is None else torch.addmm(
            b[expert], h, w[expert], out=out)
        if layer < last:
            h = h.relu_()
    return h


class _GroupedFeedForward(torch.autograd.Function):
    """y_SO = FFN_{expert(s)}(x_SD) for rows sorted by expert with ``counts`` rows each."""

    @staticmethod
    def forward(ctx, x_SD, counts, recompute, *params):
        num_layers = len(params) // 2
        weights, biases = params[:num_layers], params[num_layers:]
        rows = x_SD.shape[0]
        y_SO = x_SD.new_empty(rows, weights[-1].shape[-1])
        # Post-ReLU activations of each hidden layer, kept for backward unless recomputing.
        hidden = [] if recompute else [x_SD.new_empty(rows, w.shape[-1]) for w in weights[:-1]]
        for expert, start, end in _segments(counts):
            hidden_rows = [h[start:end] for h in hidden] if hidden else None
            _expert_forward(x_SD[start:end], weights, biases, expert, hidden_rows, y_SO[start:end])
        ctx.counts, ctx.recompute, ctx.num_layers = counts, recompute, num_layers
        ctx.save_for_backward(x_SD, *params, *hidden)
        return y_SO

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y_SO):
        num_layers = ctx.num_layers
        saved = ctx.saved_tensors
        x_SD = saved[0]
        weights = saved[1 : 1 + num_layers]
        biases = saved[1 + num_layers : 1 + 2 * num_layers]
        hidden = list(saved[1 + 2 * num_layers :])
        grad_y_SO = grad_y_SO.contiguous()

        grad_x_SD = torch.empty_like(x_SD) if ctx.needs_input_grad[0] else None
        grad_w = [torch.empty_like(w) for w in weights]
        grad_b = [torch.empty_like(b) for b in biases]
        done = [False] * weights[0].shape[0]
        for expert, start, end in _segments(ctx.counts):
            done[expert] = True
            x_rows = x_SD[start:end]
            if ctx.recompute:
                acts = [x_SD.new_empty(end - start, w.shape[-1]) for w in weights[:-1]]
                _expert_forward(x_rows, weights, biases, expert, acts)
            else:
                acts = [h[start:end] for h in hidden]
            inputs = [x_rows] + acts  # input of each layer
            g = grad_y_SO[start:end]
            for layer in reversed(range(num_layers)):
                torch.mm(inputs[layer].t(), g, out=grad_w[layer][expert])
                torch.sum(g, dim=0, out=grad_b[layer][expert])
                w_t = weights[layer][expert].t()
                if layer > 0:
                    # ReLU'(pre-activation) is 1 exactly where the post-ReLU value is > 0.
                    g = (g @ w_t).masked_fill_(inputs[layer] <= 0, 0)
                elif grad_x_SD is not None:
                    torch.mm(g, w_t, out=grad_x_SD[start:end])
        for expert, used in enumerate(done):
            if not used:
                for grad in grad_w + grad_b:
                    grad[expert].zero_()
        return (grad_x_SD, None, None, *grad_w, *grad_b)


class FeedForwardExperts(nn.Module):
    """``num_experts`` ReLU MLPs, input_dim → hidden_dim (× num_hidden_layers) → output_dim.

    ``forward(x_SD, counts)`` takes rows sorted by expert (``counts[e]`` rows for expert e, in
    order) and returns each row's expert output. Each expert is initialised like an
    ``nn.Linear`` stack (uniform ±1/sqrt(fan_in)).
    """

    def __init__(self, num_experts: int, input_dim: int, hidden_dim: int, output_dim: int,
                 num_hidden_layers: int = 1, recompute_activations: bool = False):
        super().__init__()
        self.num_experts = num_experts
        self.recompute_activations = recompute_activations
        dims = [input_dim] + [hidden_dim] * num_hidden_layers + [output_dim]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, d_in, d_out)) for d_in, d_out in zip(dims, dims[1:])
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, d_out)) for d_out in dims[1:]
        )
        self.reset_parameters()

    def reset_parameters(self):
        for w, b in zip(self.weights, self.biases):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    @property
    def output_dim(self) -> int:
        return self.weights[-1].shape[-1]

    def forward(self, x_SD: torch.Tensor, counts: List[int]) -> torch.Tensor:
        if len(counts) != self.num_experts or sum(counts) != x_SD.shape[0]:
            raise ValueError(
                f"counts must list rows for each of the {self.num_experts} experts and add up to "
                f"{x_SD.shape[0]} rows; got {len(counts)} entries summing to {sum(counts)}"
            )
        # Compute in the weights' dtype (e.g. fp32 master weights under autocast), return in x's.
        param_dtype = self.weights[0].dtype
        y_SO = _GroupedFeedForward.apply(
            x_SD.to(param_dtype).contiguous(), tuple(counts), self.recompute_activations,
            *self.weights, *self.biases,
        )
        return y_SO.to(x_SD.dtype)

    def extra_repr(self) -> str:
        dims = [self.weights[0].shape[1]] + [w.shape[2] for w in self.weights]
        return f"num_experts={self.num_experts}, dims={'→'.join(map(str, dims))}"
