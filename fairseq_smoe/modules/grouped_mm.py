"""The experts as grouped matrix products (``torch._grouped_mm``): the GPU path (PAPER.md §3).

On a GPU the expert loop of experts.py would launch a handful of small kernels per expert and
per step, each too small to fill the device. ``torch._grouped_mm(x_SD, weight_EIO, offs=...)``
multiplies every expert's block of rows by its own weight in one kernel (CUTLASS grouped GEMM on
CUDA with bf16, Hopper and newer), reading the block boundaries from a device tensor, so a layer
of the experts costs one launch whatever the number of experts, and the counts never travel
back to the host a second time.

    h = ReLU(grouped_mm(x_SD, W_1, offs) + b_1[expert_S])      per hidden layer
    y = grouped_mm(h, W_L, offs) + b_L[expert_S]

The backward is autograd's (the derivatives of ``_grouped_mm`` are grouped products again). With
``recompute`` the hidden activations are recomputed in backward (App. D) via activation
checkpointing.

``use_grouped_mm(mode, device, dtype, dims)`` says where this path is the default: CUDA, bf16
weights, compute capability 9.0 or newer, layer sizes that are multiples of 8, and a torch that
has ``_grouped_mm``. Elsewhere the expert loop of experts.py is faster (on CPU, one MKL product
per expert on its own thread) and stays the default; ``FeedForwardExperts.grouped_mm =
"always"`` (or ``SMOE_GROUPED_MM=1``) forces this path anywhere torch has the operator, which
is how the CPU tests run it through torch's own CPU implementation.
"""

import itertools
import os
from typing import Sequence

import torch
from torch.utils.checkpoint import checkpoint

MODES = ("auto", "always", "never")


def default_mode() -> str:
    """``SMOE_GROUPED_MM`` from the environment: 1/always, 0/never, or auto (the default)."""
    value = os.environ.get("SMOE_GROUPED_MM", "auto").strip().lower()
    aliases = {"1": "always", "true": "always", "yes": "always", "0": "never", "false": "never",
               "no": "never", "": "auto"}
    value = aliases.get(value, value)
    if value not in MODES:
        raise ValueError(f"SMOE_GROUPED_MM must be 1, 0 or auto; got {os.environ['SMOE_GROUPED_MM']!r}")
    return value


def available() -> bool:
    return hasattr(torch, "_grouped_mm")


def use_grouped_mm(mode: str, device: torch.device, dtype: torch.dtype,
                   dims: Sequence[int] = ()) -> bool:
    """Whether experts of layer sizes ``dims`` run as grouped products under ``mode`` (see the
    module docstring). The operator needs every row of every operand 16-byte aligned, i.e.
    sizes that are multiples of 16 bytes (8 bf16 or 4 fp32 values)."""
    if mode not in MODES:
        raise ValueError(f"grouped_mm must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "never":
        return False
    aligned = all(d * dtype.itemsize % 16 == 0 for d in dims)
    if mode == "always":
        if not available():
            raise RuntimeError(f"grouped_mm='always' needs torch._grouped_mm, which torch "
                               f"{torch.__version__} lacks; upgrade torch or use 'auto'")
        if not aligned:
            raise ValueError(f"grouped_mm='always' needs layer sizes that are multiples of "
                             f"{16 // dtype.itemsize} for {dtype}; got {list(dims)}: choose such "
                             f"sizes or use 'auto'")
        return True
    device = torch.device(device)
    return (available() and aligned and device.type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device) >= (9, 0))


def _layers(x_SD, offs_E, expert_S, *params):
    num_layers = len(params) // 2
    weights, biases = params[:num_layers], params[num_layers:]
    h = x_SD
    for layer, (w, b) in enumerate(zip(weights, biases)):
        h = torch._grouped_mm(h, w, offs=offs_E) + b.index_select(0, expert_S)
        if layer < num_layers - 1:
            h = torch.relu(h)
    return h


def grouped_experts(x_SD: torch.Tensor, counts: Sequence[int], weights, biases,
                    recompute: bool = False) -> torch.Tensor:
    """y_SO: every expert's feed-forward network on its block of rows (``counts[e]`` consecutive
    rows for expert e), one grouped product per layer. Differentiable by autograd."""
    device = x_SD.device
    if x_SD.shape[0] == 0:  # no rows: zero-size output, but keep every parameter in the graph
        zero = sum(p.sum() for p in (*weights, *biases)) * 0
        return x_SD.new_zeros(0, weights[-1].shape[-1]) + zero
    # Block ends, int32 on the device (the operator's contract); one small host-to-device copy.
    offs_E = torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=device)
    expert_S = torch.repeat_interleave(
        torch.arange(len(counts), device=device), torch.tensor(counts, device=device),
        output_size=x_SD.shape[0])
    if recompute and torch.is_grad_enabled():
        return checkpoint(_layers, x_SD, offs_E, expert_S, *weights, *biases, use_reentrant=False)
    return _layers(x_SD, offs_E, expert_S, *weights, *biases)
