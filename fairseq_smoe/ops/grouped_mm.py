"""The ``grouped_mm`` backend: the experts as ``torch._grouped_mm`` grouped products.

``torch._grouped_mm(x_SD, weight_EIO, offs=offs_E)`` multiplies every group's block of rows by
its own weight in one call, reading the block ends from a device tensor (CUTLASS grouped GEMM on
CUDA: fast for bf16 on compute capability 9.x; on CPU torch's own implementation, which is how
the tests run it). Around it, per layer:

    h = ReLU(where(valid, grouped_mm(where(valid, h), W, offs), 0) + b[expert])

The ``where`` masks matter: the operator leaves rows past the last offset (the dropped tail)
unwritten, in forward and in the input gradient, so they are zeroed on both sides. The bias
goes through ``_BiasRows``, whose backward sums the bias gradient in fp32.

CUTLASS's grouped GEMM (the bf16 path on compute capability 9.x/10.x) takes fewer than 1024
groups per call ("Can't process more than 1024 groups" at 1024 itself), so a layer of
``GROUP_LIMIT`` = 1024 experts or more runs in equal chunks of at most ``MAX_GROUPS`` = 1023
(1024 experts: two chunks of 512). A chunk's rows start at a device-side offset; rather than
reading it, the rows are rotated so the chunk starts at row 0 (an index_select), multiplied,
and added back (index_add): memory traffic of one extra pass over the rows per chunk, no host
read.

Where it is the default (``auto``, see ops/__init__.py): CUDA, bf16 weights, compute capability
9.x (not 10.x/12.x, where the operator has open correctness bugs), sizes that are multiples of
16 bytes. torch 2.13's fp16/fp32 ``_grouped_mm`` on CUDA is a host loop after ``offs.cpu()``.
"""

from typing import Optional, Sequence

import torch

from .resident import ResidentBackend

GROUP_LIMIT = 1024  # CUTLASS grouped GEMM refuses this many groups per call, or more
MAX_GROUPS = GROUP_LIMIT - 1  # the most groups one call is given


def available() -> bool:
    return hasattr(torch, "_grouped_mm")


def aligned(dtype: torch.dtype, dims: Sequence[int]) -> bool:
    """The operator needs every row of every operand 16-byte aligned."""
    return all(d * dtype.itemsize % 16 == 0 for d in dims)


def fast_on(device, dtype: torch.dtype, dims: Sequence[int] = ()) -> bool:
    """Where ``auto`` picks this backend: CUDA, bf16, compute capability 9.x, aligned sizes."""
    device = torch.device(device)
    return (available() and device.type == "cuda" and dtype == torch.bfloat16
            and aligned(dtype, dims) and torch.cuda.get_device_capability(device)[0] == 9)


def check_usable(dtype: torch.dtype, dims: Sequence[int]) -> None:
    if not available():
        raise RuntimeError(f"backend 'grouped_mm' needs torch._grouped_mm, which torch "
                           f"{torch.__version__} lacks; upgrade torch or use backend 'auto'")
    if not aligned(dtype, dims):
        raise ValueError(f"backend 'grouped_mm' needs layer sizes that are multiples of "
                         f"{16 // dtype.itemsize} for {dtype}; got {list(dims)}: choose such sizes "
                         f"or use backend 'auto'")


def _grouped_mm(x, w, offs):
    return torch._grouped_mm(x, w, offs=offs)  # looked up per call: tests may wrap it


def chunk_bounds(num_groups: int):
    """(first, end) of equal chunks of at most ``MAX_GROUPS`` groups covering ``num_groups``."""
    chunks = -(-num_groups // MAX_GROUPS)
    size = -(-num_groups // chunks)
    return [(first, min(num_groups, first + size)) for first in range(0, num_groups, size)]


def chunked_grouped_mm(x_SD: torch.Tensor, weight_GIO: torch.Tensor, offs_G: torch.Tensor,
                       valid_S: torch.Tensor) -> torch.Tensor:
    """Σ over groups of rows × their weight, fewer than ``GROUP_LIMIT`` groups per call; rows
    outside every group (``valid_S`` False) are 0 and pass no gradient."""
    S, G, N = x_SD.shape[0], weight_GIO.shape[0], weight_GIO.shape[2]
    valid_S1 = valid_S[:, None]
    x_SD = torch.where(valid_S1, x_SD, 0)
    if G <= MAX_GROUPS:
        return torch.where(valid_S1, _grouped_mm(x_SD, weight_GIO, offs_G), 0)
    rows_S = torch.arange(S, device=x_SD.device)
    y_SO = x_SD.new_zeros(S, N)
    for first, end in chunk_bounds(G):
        start = offs_G[first - 1].long() if first else offs_G.new_zeros((), dtype=torch.long)
        rotate_S = torch.remainder(rows_S + start, S)  # the chunk's rows first
        offs_C = offs_G[first:end] - start.to(offs_G.dtype)
        keep_S1 = (rows_S < offs_C[-1])[:, None]
        x_CD = torch.where(keep_S1, x_SD.index_select(0, rotate_S), 0)
        y_CO = torch.where(keep_S1, _grouped_mm(x_CD, weight_GIO[first:end], offs_C), 0)
        y_SO = y_SO.index_add(0, rotate_S, y_CO)
    return y_SO


class _BiasRows(torch.autograd.Function):
    """bias_GO[key_S] (0 for the dropped tail), with the gradient summed per group in fp32."""

    @staticmethod
    def forward(ctx, bias_GO, key_S):
        G = bias_GO.shape[0]
        ctx.save_for_backward(key_S)
        ctx.num_groups = G
        padded = torch.cat([bias_GO, bias_GO.new_zeros(1, bias_GO.shape[1])])
        return padded.index_select(0, key_S)

    @staticmethod
    def backward(ctx, grad_SO):
        (key_S,) = ctx.saved_tensors
        G = ctx.num_groups
        total = grad_SO.new_zeros(G + 1, grad_SO.shape[1], dtype=torch.float32)
        total.index_add_(0, key_S, grad_SO.float())
        return total[:G].to(grad_SO.dtype), None


def bias_rows(bias_GO, key_S):
    return _BiasRows.apply(bias_GO, key_S)


class GroupedMMBackend(ResidentBackend):
    name = "grouped_mm"

    def linear(self, x_SD, grouping, weight_GIO, bias_GO: Optional[torch.Tensor], relu: bool):
        if x_SD.shape[0] == 0:  # no rows: keep every parameter in the graph
            params = [weight_GIO] + ([] if bias_GO is None else [bias_GO])
            return x_SD.new_zeros(0, weight_GIO.shape[2]) + sum(p.sum() for p in params) * 0
        y_SO = chunked_grouped_mm(x_SD, weight_GIO, grouping.offs_G, grouping.valid_S)
        if bias_GO is not None:
            y_SO = y_SO + bias_rows(bias_GO, grouping.key_S)
        return torch.relu(y_SO) if relu else y_SO

    def grouped_matmul(self, x_SD, grouping, weight_GIO):
        # The gate projection, in fp32 (the caller casts). fp32 _grouped_mm on CUDA is a host
        # loop after offs.cpu(): there our fp32 Triton kernel runs it when triton is installed
        # (without triton it stays the fp32 operator: correct, with that sync). Inside
        # torch.compile too, on any device: torch's fake _grouped_mm traces bf16 only.
        compiling = hasattr(torch, "compiler") and torch.compiler.is_compiling()
        if (x_SD.is_cuda or compiling) and weight_GIO.dtype == torch.float32:
            from . import triton_available

            if triton_available():
                from .triton_experts import TritonBackend

                return TritonBackend().linear(x_SD, grouping, weight_GIO, None, False)
        return self.linear(x_SD, grouping, weight_GIO, None, False)
