"""The ``triton`` backend: our own Triton kernels for the experts' grouped products.

Three kernels over rows sorted by group (expert), each one launch whatever the number of groups,
reading the group ends from the device (``Grouping.offs_G``), never from the host:

    grouped_linear   y[rows of g] = act(x[rows of g] @ W[g] + b[g])       forward, and with W
                     read transposed, the input gradient ∂L/∂x = ∂L/∂y @ W[g]ᵀ
    grouped_wgrad    ∂L/∂W[g] = x[rows of g]ᵀ @ ∂L/∂y[rows of g]          one program per
                     (group, tile of W[g]), looping over that group's rows

Products accumulate in fp32 (IEEE fp32 for fp32 operands: no TF32), results are rounded once to
the operands' dtype; the bias gradient is summed in fp32 (one index_add). The forward grid is
an upper bound on the row tiles, ceil(S/BM) + G, so that it is known from the shapes alone; a
small table built on the device (``_tile_table``: a cumsum and a searchsorted) maps each program
to its group and first row, and programs past the last tile return at once. Rows of the dropped
tail (past the last offset) are never touched: outputs start zeroed.

On CPU the same kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set by
``fairseq_smoe.ops`` when no CUDA device is present and the variable is unset, before triton is
imported). The interpreter
evaluates a bf16 ``tl.dot`` wrongly (numpy has no bf16), so there the operands are widened to
fp32 first; on a GPU they go to the tensor cores as they are.

``reference`` for these kernels is ``resident.reference_linear`` (and the loop backend); tests
compare them in fp32, fp16 and bf16.
"""

import os

import torch
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _disable_current_modes

from .resident import ResidentBackend

try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - exercised only without triton
    raise ImportError("backend 'triton' needs the triton package (pip install 'triton==3.9.*', "
                      "an optional dependency of fairseq-smoe); or use backend 'loop' or "
                      "'grouped_mm'") from error
try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError as error:  # pragma: no cover - a triton without the interpreter we know
    raise ImportError(f"triton {getattr(triton, '__version__', '?')} has no "
                      f"triton.runtime.interpreter.InterpretedFunction; the triton backend is "
                      f"tested with triton 3.9 (pip install 'triton==3.9.*')") from error

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRET and not isinstance(tl.zeros, InterpretedFunction):
    # triton builds its own helpers (tl.zeros, tl.sum, ...) for the interpreter only when
    # TRITON_INTERPRET is set at its import; imported earlier (torch._dynamo imports it), our
    # kernels would fail with "Cannot call @triton.jit'd outside of the scope of a kernel".
    raise ImportError("triton was imported before TRITON_INTERPRET=1 was set, so its interpreter "
                      "cannot run the triton backend on CPU: set TRITON_INTERPRET=1 in the "
                      "environment, or import fairseq_smoe before anything that imports triton "
                      "or torch._dynamo")

# Kernel launches since import (the benchmark's launch proxy), and a dry-run switch for counting
# launches at sizes the interpreter would take minutes for: with it, launches are counted and
# skipped (outputs stay zero). The routing is device-resident, so what runs never depends on
# the values: the count is the same as a real run's.
LAUNCHES = [0]
DRY_RUN = [False]

if INTERPRET:
    BLOCKS = dict(BM=16, BN=16, BK=16)
    NUM_WARPS = 1
else:
    BLOCKS = dict(BM=64, BN=64, BK=32)
    NUM_WARPS = 4


@triton.jit
def _grouped_linear_kernel(x_ptr, w_ptr, b_ptr, y_ptr, offs_ptr, tile_group_ptr, tile_row_ptr,
                           N, K, sxm, sxk, swg, swk, swn, sym, syn,
                           HAS_BIAS: tl.constexpr, RELU: tl.constexpr, UPCAST: tl.constexpr,
                           IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           BK: tl.constexpr):
    t = tl.program_id(0)
    pn = tl.program_id(1)
    g = tl.load(tile_group_ptr + t).to(tl.int64)
    row0 = tl.load(tile_row_ptr + t).to(tl.int64)
    end = tl.load(offs_ptr + g).to(tl.int64)
    if row0 < end:
        rm = row0 + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        rmask = rm < end
        nmask = rn < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            kmask = rk < K
            a = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk,
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(w_ptr + g * swg + rk[:, None] * swk + rn[None, :] * swn,
                        mask=kmask[:, None] & nmask[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        if HAS_BIAS:
            acc += tl.load(b_ptr + g * N + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if RELU:
            acc = tl.maximum(acc, 0.0)
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _grouped_wgrad_kernel(x_ptr, g_ptr, dw_ptr, offs_ptr, K, N, sxm, sxk, sgm, sgn, sdg, sdk, sdn,
                          UPCAST: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr,
                          BK: tl.constexpr, BN: tl.constexpr):
    e = tl.program_id(0).to(tl.int64)
    pk = tl.program_id(1)
    pn = tl.program_id(2)
    start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0).to(tl.int64)
    end = tl.load(offs_ptr + e).to(tl.int64)
    rk = pk * BK + tl.arange(0, BK)
    rn = pn * BN + tl.arange(0, BN)
    kmask = rk < K
    nmask = rn < N
    acc = tl.zeros((BK, BN), dtype=tl.float32)
    for m0 in range(start, end, BM):
        rm = m0 + tl.arange(0, BM)
        rmask = rm < end
        a = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk,
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        gy = tl.load(g_ptr + rm[:, None] * sgm + rn[None, :] * sgn,
                     mask=rmask[:, None] & nmask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            gy = gy.to(tl.float32)
        if IEEE:
            acc += tl.dot(tl.trans(a), gy, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(a), gy)
    tl.store(dw_ptr + e * sdg + rk[:, None] * sdk + rn[None, :] * sdn,
             acc.to(dw_ptr.dtype.element_ty), mask=kmask[:, None] & nmask[None, :])


def _check_device(*tensors):
    for t in tensors:
        if INTERPRET and t.device.type != "cpu":
            raise RuntimeError("the Triton interpreter (TRITON_INTERPRET=1) runs on CPU tensors only; "
                               "unset TRITON_INTERPRET to run the triton backend on the GPU")
        if not INTERPRET and t.device.type != "cuda":
            raise RuntimeError(f"the triton backend's compiled kernels need CUDA tensors; got "
                               f"{t.device} (set TRITON_INTERPRET=1 before importing triton to run "
                               f"them on CPU, slowly)")


def _launch(kernel, grid, *args, **meta):
    LAUNCHES[0] += 1
    if DRY_RUN[0]:
        return
    if INTERPRET:
        # The interpreter's own tensor copies are no kernels of ours: keep them out of any
        # operator-counting mode (tests, benchmark).
        with _disable_current_modes():
            kernel[grid](*args, **meta, num_warps=NUM_WARPS)
    else:
        kernel[grid](*args, **meta, num_warps=NUM_WARPS)


def _tile_table(grouping, BM: int):
    """(group, first row) of each of the ceil(S/BM) + G row tiles, built on the device."""
    key = ("tiles", BM)
    if key not in grouping.cache:
        counts = grouping.counts_G
        G, S = counts.shape[0], grouping.num_rows
        tiles_G = torch.div(counts + (BM - 1), BM, rounding_mode="floor")
        tile_end_G = torch.cumsum(tiles_G, 0)
        t = torch.arange(triton.cdiv(S, BM) + G, device=counts.device)
        group_t = torch.searchsorted(tile_end_G, t, right=True).clamp_(max=G - 1)
        first_row_G = grouping.offs_G.long() - counts
        first_tile_G = tile_end_G - tiles_G
        row_t = first_row_G[group_t] + (t - first_tile_G[group_t]) * BM
        grouping.cache[key] = (group_t, row_t)
    return grouping.cache[key]


def _dtype_flags(dtype):
    return dict(UPCAST=INTERPRET and dtype != torch.float32, IEEE=dtype == torch.float32)


def grouped_linear(x_SK, weight_GKN, bias_GN, grouping, relu: bool, transpose: bool = False):
    """act(x @ W[g] + b[g]) per group (W[g]ᵀ with ``transpose``); dropped rows stay 0."""
    _check_device(x_SK, weight_GKN)
    S = x_SK.shape[0]
    if transpose:
        K, N = weight_GKN.shape[2], weight_GKN.shape[1]
        swk, swn = weight_GKN.stride(2), weight_GKN.stride(1)
    else:
        K, N = weight_GKN.shape[1], weight_GKN.shape[2]
        swk, swn = weight_GKN.stride(1), weight_GKN.stride(2)
    y_SN = x_SK.new_zeros(S, N)
    if S == 0:
        return y_SN
    BM, BN, BK = BLOCKS["BM"], BLOCKS["BN"], BLOCKS["BK"]
    group_t, row_t = _tile_table(grouping, BM)
    bias = bias_GN.contiguous() if bias_GN is not None else y_SN
    grid = (group_t.shape[0], triton.cdiv(N, BN))
    _launch(_grouped_linear_kernel, grid, x_SK, weight_GKN, bias, y_SN, grouping.offs_G, group_t,
            row_t, N, K, x_SK.stride(0), x_SK.stride(1), weight_GKN.stride(0), swk, swn,
            y_SN.stride(0), y_SN.stride(1), HAS_BIAS=bias_GN is not None, RELU=relu,
            BM=BM, BN=BN, BK=BK, **_dtype_flags(x_SK.dtype))
    return y_SN


def grouped_wgrad(x_SK, grad_SN, grouping, out_dtype):
    """∂L/∂W[g] = x[rows of g]ᵀ @ grad[rows of g], accumulated in fp32; 0 for empty groups."""
    G, K, N = grouping.num_groups, x_SK.shape[1], grad_SN.shape[1]
    dw_GKN = torch.zeros(G, K, N, dtype=out_dtype, device=x_SK.device)
    if x_SK.shape[0] == 0:
        return dw_GKN
    BM, BN, BK = BLOCKS["BM"], BLOCKS["BN"], BLOCKS["BK"]
    grid = (G, triton.cdiv(K, BK), triton.cdiv(N, BN))
    _launch(_grouped_wgrad_kernel, grid, x_SK, grad_SN, dw_GKN, grouping.offs_G, K, N,
            x_SK.stride(0), x_SK.stride(1), grad_SN.stride(0), grad_SN.stride(1),
            dw_GKN.stride(0), dw_GKN.stride(1), dw_GKN.stride(2), BM=BM, BK=BK, BN=BN,
            **_dtype_flags(x_SK.dtype))
    return dw_GKN


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_SK, weight_GKN, bias_GN, grouping, relu):
        x_SK = x_SK.contiguous()
        y_SN = grouped_linear(x_SK, weight_GKN, bias_GN, grouping, relu)
        ctx.save_for_backward(x_SK, weight_GKN, y_SN if relu else None)
        ctx.grouping, ctx.relu, ctx.has_bias = grouping, relu, bias_GN is not None
        ctx.bias_dtype = None if bias_GN is None else bias_GN.dtype
        return y_SN

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_SN):
        x_SK, weight_GKN, y_SN = ctx.saved_tensors
        grouping = ctx.grouping
        grad_SN = grad_SN.to(x_SK.dtype).contiguous()
        if ctx.relu:  # ReLU'(pre-activation) is 1 exactly where the output is > 0
            grad_SN = torch.where(y_SN > 0, grad_SN, 0)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_linear(grad_SN, weight_GKN, None, grouping, False, transpose=True)
        if ctx.needs_input_grad[1]:
            grad_w = grouped_wgrad(x_SK, grad_SN, grouping, weight_GKN.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            G = grouping.num_groups
            total = grad_SN.new_zeros(G + 1, grad_SN.shape[1], dtype=torch.float32)
            grad_b = total.index_add_(0, grouping.key_S, grad_SN.float())[:G].to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None


class TritonBackend(ResidentBackend):
    name = "triton"

    def linear(self, x_SD, grouping, weight_GIO, bias_GO, relu):
        return _GroupedLinear.apply(x_SD, weight_GIO, bias_GO, grouping, relu)
