"""The ``triton`` backend: our own Triton kernels for the experts' grouped products.

Three kernels over rows sorted by group (expert), each one launch whatever the number of groups,
reading the group ends from the device (``Grouping.offs_G``), never from the host:

    grouped_linear   y[rows of g] = act(x[rows of g] @ W[g] + b[g])       forward, and with W
                     read transposed, the input gradient ∂L/∂x = ∂L/∂y @ W[g]ᵀ
    grouped_wgrad    ∂L/∂W[g] = x[rows of g]ᵀ @ ∂L/∂y[rows of g]          one program per
                     (group, tile of W[g]), looping over that group's rows

Products accumulate in fp32, results are rounded once to the operands' dtype; the bias gradient
is summed in fp32 (one index_add). fp32 operands follow PyTorch's TF32 setting for CUDA matmuls
(``torch.backends.cuda.matmul.fp32_precision``, before torch 2.9 ``allow_tf32``; default off):
TF32 tensor cores when it allows them, else IEEE fp32 products, decided on the host at each
call. Tile sizes, warps and pipeline stages depend on the dtype and the compute capability
(``kernel_config``): IEEE fp32 on sm_8x takes smaller tiles, which compile without spills;
``scripts/triton_aot_report.py`` compiles every kernel and config ahead of time for sm_80 and
sm_90, without a GPU, and prints registers, spills and shared memory. The forward grid is
an upper bound on the row tiles, ceil(S/BM) + G, so that it is known from the shapes alone; a
small table built on the device (``_tile_table``: a cumsum and a searchsorted) maps each program
to its group and first row, and programs past the last tile return at once. Rows of the dropped
tail (past the last offset) are never touched: outputs start zeroed.

On CPU the same kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set when this
module, the triton backend, is first imported on a machine without CUDA, the variable unset and
triton not imported yet: nothing else of the plugin sets it). The interpreter
evaluates a bf16 ``tl.dot`` wrongly (numpy has no bf16), so there the operands are widened to
fp32 first; on a GPU they go to the tensor cores as they are.

``reference`` for these kernels is ``resident.reference_linear`` (and the loop backend); tests
compare them in fp32, fp16 and bf16.

Names: host-side tensors carry the shape suffixes of docs/layer.md (``x_SI``, ``weight_GIO``,
``grad_SO``); inside the kernels the letters are a matrix product's, M rows, N output columns,
K the reduced dimension, with tiles BM, BN, BK.

Under ``torch.compile`` the layer calls the kernels through the custom operators
``fairseq_smoe::grouped_linear`` and ``fairseq_smoe::grouped_wgrad`` (fake implementations and
autograd registered), so a ``fullgraph=True`` compile of a training step traces
(tests/test_module_compile.py).
"""

import os
import sys
from typing import NamedTuple, Optional

import torch
from torch.utils._python_dispatch import _disable_current_modes

from .autograd import first_order_only
from .resident import ResidentBackend

# Choosing this backend on a machine without CUDA means Triton's interpreter, which triton sets
# up only if TRITON_INTERPRET is set when it is first imported: set it here, before the import.
if "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules \
        and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

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
                      "environment, or choose the triton backend before anything imports triton "
                      "(torch.compile, torch._dynamo)")

# Kernel launches since import (the benchmark's launch proxy), and a dry-run switch for counting
# launches at sizes the interpreter would take minutes for: with it, launches are counted and
# skipped (outputs stay zero). The routing is device-resident, so what runs never depends on
# the values: the count is the same as a real run's.
LAUNCHES = [0]
DRY_RUN = [False]

@triton.jit
def _grouped_linear_kernel(x_ptr, w_ptr, b_ptr, y_ptr, offs_ptr, tile_group_ptr, tile_row_ptr,
                           N, K, sxm, sxk, swg, swk, swn, sym, syn,
                           HAS_BIAS: tl.constexpr, RELU: tl.constexpr, UPCAST: tl.constexpr,
                           PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
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
            acc += tl.dot(a, b, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + g * N + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if RELU:
            acc = tl.maximum(acc, 0.0)
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _grouped_wgrad_kernel(x_ptr, g_ptr, dw_ptr, offs_ptr, K, N, sxm, sxk, sgm, sgn, sdg, sdk, sdn,
                          UPCAST: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr,
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
        acc += tl.dot(tl.trans(a), gy, input_precision=PRECISION)
    tl.store(dw_ptr + e * sdg + rk[:, None] * sdk + rn[None, :] * sdn,
             acc.to(dw_ptr.dtype.element_ty), mask=kmask[:, None] & nmask[None, :])


def _check_device(*tensors):
    if CAPTURE[0] is not None:
        return
    for t in tensors:
        if INTERPRET and t.device.type != "cpu":
            raise RuntimeError("the Triton interpreter (TRITON_INTERPRET=1) runs on CPU tensors only; "
                               "unset TRITON_INTERPRET to run the triton backend on the GPU")
        if not INTERPRET and t.device.type != "cuda":
            raise RuntimeError(f"the triton backend's compiled kernels need CUDA tensors; got "
                               f"{t.device} (set TRITON_INTERPRET=1 before importing triton to run "
                               f"them on CPU, slowly)")


class KernelConfig(NamedTuple):
    """Tiles and launch options of one kernel. ``_grouped_linear_kernel``: BM rows × BN output
    columns per program, BK of the reduction per step. ``_grouped_wgrad_kernel``: a BK × BN tile
    of ∂L/∂W[g] per program, BM rows per step."""

    BM: int
    BN: int
    BK: int
    num_warps: int
    num_stages: int


# The interpreter ignores warps and stages, and its cost grows with the tile: small tiles.
INTERPRETER_CONFIG = KernelConfig(BM=16, BN=16, BK=16, num_warps=1, num_stages=1)
# What the host launches everywhere but below: these tiles compile without spills for every
# dtype and precision on sm_90 (ptxas-blackwell of the triton wheel), and for fp16, bf16 and
# TF32 products on sm_80 (scripts/triton_aot_report.py).
DEFAULT_CONFIG = KernelConfig(BM=64, BN=64, BK=32, num_warps=4, num_stages=3)
# IEEE fp32 products before compute capability 9.0. They lower to FMAs on register operands, and
# for a 64-row tile the wheel's ptxas for sm_8x (12.9) needs far more registers than its
# ptxas-blackwell does for sm_90: at DEFAULT_CONFIG the weight-gradient kernel spilled about
# 3.6 KB a thread and the transposed forward sat at the 255-register ceiling (spilling with 2
# stages). 32 rows per tile (per step, for the weight gradient) leave both far below it.
FP32_IEEE_SM8X_CONFIG = KernelConfig(BM=32, BN=64, BK=32, num_warps=4, num_stages=3)


def kernel_config(dtype: torch.dtype, capability, precision: str) -> KernelConfig:
    """The tiles both kernels launch with for operands of ``dtype`` multiplied at ``precision``
    (``_dot_precision``) on a device of compute ``capability`` (major, minor); None: the
    interpreter."""
    if capability is None:
        return INTERPRETER_CONFIG
    if dtype == torch.float32 and precision == "ieee" and tuple(capability) < (9, 0):
        return FP32_IEEE_SM8X_CONFIG
    return DEFAULT_CONFIG


_CAPABILITIES = {}


def _capability(device: torch.device):
    """Compute capability of a CUDA ``device`` (None under the interpreter), asked once."""
    if CAPTURE[0] is not None:
        return CAPTURE[0].capability
    if INTERPRET:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITIES:
        _CAPABILITIES[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITIES[index]


def fp32_matmul_precision() -> str:
    """"tf32" where PyTorch lets fp32 CUDA matmuls run on TF32 tensor cores, else "ieee": torch
    >= 2.9's ``torch.backends.cuda.matmul.fp32_precision`` (which also reflects the generic
    ``torch.backends.fp32_precision`` and ``torch.set_float32_matmul_precision``), else the
    older ``allow_tf32``. Read on the host at every call (nothing on the device)."""
    matmul = torch.backends.cuda.matmul
    try:
        # Read first: once the new API has set it, reading allow_tf32 raises.
        precision = matmul.fp32_precision
    except AttributeError:  # torch < 2.9
        return "tf32" if matmul.allow_tf32 else "ieee"
    return "tf32" if precision == "tf32" else "ieee"


def _dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the kernels' ``tl.dot``: what PyTorch's TF32 setting says for fp32
    on CUDA; IEEE under the interpreter, which runs CPU tensors (TF32 is a CUDA setting).
    fp16/bf16 operands get Triton's default, "tf32", which concerns fp32 operands only."""
    if CAPTURE[0] is not None:
        return CAPTURE[0].precision
    if dtype != torch.float32:
        return "tf32"
    return "ieee" if INTERPRET else fp32_matmul_precision()


class Capture(NamedTuple):
    """For ``CAPTURE``: the device to choose for, and the launches recorded."""

    capability: tuple
    precision: str
    launches: list


# A Capture here makes ``_launch`` record (kernel, args, constexprs, config) instead of launching,
# and the host choose for the Capture's device: how scripts/triton_aot_report.py learns the exact
# kernels and arguments the host code would launch on a GPU, from CPU tensors.
CAPTURE = [None]


def _launch(kernel, grid, *args, config: KernelConfig, **meta):
    LAUNCHES[0] += 1
    if CAPTURE[0] is not None:
        CAPTURE[0].launches.append((kernel, args, meta, config))
        return
    if DRY_RUN[0]:
        return
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    if INTERPRET:
        # The interpreter's own tensor copies are no kernels of ours: keep them out of any
        # operator-counting mode (tests, benchmark).
        with _disable_current_modes():
            kernel[grid](*args, **meta, **options)
    else:
        kernel[grid](*args, **meta, **options)


def _tile_table(counts_G, offs_G, S: int, BM: int):
    """(group, first row) of each of the ceil(S/BM) + G row tiles, built on the device."""
    G = counts_G.shape[0]
    tiles_G = torch.div(counts_G + (BM - 1), BM, rounding_mode="floor")
    tile_end_G = torch.cumsum(tiles_G, 0)
    t = torch.arange(triton.cdiv(S, BM) + G, device=counts_G.device)
    group_t = torch.searchsorted(tile_end_G, t, right=True).clamp_(max=G - 1)
    first_row_G = offs_G.long() - counts_G
    first_tile_G = tile_end_G - tiles_G
    row_t = first_row_G[group_t] + (t - first_tile_G[group_t]) * BM
    return group_t, row_t


def _linear(x_SI, weight_GIO, bias_GO, counts_G, offs_G, relu: bool, transpose: bool, cache=None):
    """act(x @ W[g] + b[g]) per group (W[g]ᵀ with ``transpose``); dropped rows stay 0. ``cache``:
    a dict for the tile table, kept per grouping (it depends on the tile height only)."""
    _check_device(x_SI, weight_GIO)
    S = x_SI.shape[0]
    if transpose:
        K, N = weight_GIO.shape[2], weight_GIO.shape[1]
        swk, swn = weight_GIO.stride(2), weight_GIO.stride(1)
    else:
        K, N = weight_GIO.shape[1], weight_GIO.shape[2]
        swk, swn = weight_GIO.stride(1), weight_GIO.stride(2)
    y_SO = x_SI.new_zeros(S, N)
    if S == 0:
        return y_SO
    precision = _dot_precision(x_SI.dtype)
    config = kernel_config(x_SI.dtype, _capability(x_SI.device), precision)
    key = ("tiles", config.BM)
    if cache is not None and key in cache:
        group_t, row_t = cache[key]
    else:
        group_t, row_t = _tile_table(counts_G, offs_G, S, config.BM)
        if cache is not None:
            cache[key] = (group_t, row_t)
    bias = bias_GO.contiguous() if bias_GO is not None else y_SO
    grid = (group_t.shape[0], triton.cdiv(N, config.BN))
    _launch(_grouped_linear_kernel, grid, x_SI, weight_GIO, bias, y_SO, offs_G, group_t,
            row_t, N, K, x_SI.stride(0), x_SI.stride(1), weight_GIO.stride(0), swk, swn,
            y_SO.stride(0), y_SO.stride(1), config=config, HAS_BIAS=bias_GO is not None,
            RELU=relu, UPCAST=INTERPRET and x_SI.dtype != torch.float32, PRECISION=precision,
            BM=config.BM, BN=config.BN, BK=config.BK)
    return y_SO


def grouped_linear(x_SI, weight_GIO, bias_GO, grouping, relu: bool, transpose: bool = False):
    """act(x @ W[g] + b[g]) per group (W[g]ᵀ with ``transpose``); dropped rows stay 0."""
    return _linear(x_SI, weight_GIO, bias_GO, grouping.counts_G, grouping.offs_G, relu, transpose,
                   grouping.cache)


def _wgrad(x_SI, grad_SO, offs_G, out_dtype):
    """∂L/∂W[g] = x[rows of g]ᵀ @ grad[rows of g], accumulated in fp32; 0 for empty groups."""
    G, K, N = offs_G.shape[0], x_SI.shape[1], grad_SO.shape[1]
    dw_GIO = torch.zeros(G, K, N, dtype=out_dtype, device=x_SI.device)
    if x_SI.shape[0] == 0:
        return dw_GIO
    precision = _dot_precision(x_SI.dtype)
    config = kernel_config(x_SI.dtype, _capability(x_SI.device), precision)
    grid = (G, triton.cdiv(K, config.BK), triton.cdiv(N, config.BN))
    _launch(_grouped_wgrad_kernel, grid, x_SI, grad_SO, dw_GIO, offs_G, K, N,
            x_SI.stride(0), x_SI.stride(1), grad_SO.stride(0), grad_SO.stride(1),
            dw_GIO.stride(0), dw_GIO.stride(1), dw_GIO.stride(2), config=config,
            UPCAST=INTERPRET and x_SI.dtype != torch.float32, PRECISION=precision,
            BM=config.BM, BK=config.BK, BN=config.BN)
    return dw_GIO


def grouped_wgrad(x_SI, grad_SO, grouping, out_dtype):
    """∂L/∂W[g] = x[rows of g]ᵀ @ grad[rows of g], accumulated in fp32; 0 for empty groups."""
    return _wgrad(x_SI, grad_SO, grouping.offs_G, out_dtype)


def _bias_grad(grad_SO, key_S, num_groups: int, dtype):
    total = grad_SO.new_zeros(num_groups + 1, grad_SO.shape[1], dtype=torch.float32)
    return total.index_add_(0, key_S, grad_SO.float())[:num_groups].to(dtype)


def _relu_grad(grad_SO, y_SO):
    # ReLU'(pre-activation) is 1 exactly where the output is > 0
    return torch.where(y_SO > 0, grad_SO, 0)


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_SI, weight_GIO, bias_GO, grouping, relu):
        x_SI = x_SI.contiguous()
        y_SO = grouped_linear(x_SI, weight_GIO, bias_GO, grouping, relu)
        ctx.save_for_backward(x_SI, weight_GIO, y_SO if relu else None)
        ctx.grouping, ctx.relu, ctx.has_bias = grouping, relu, bias_GO is not None
        ctx.bias_dtype = None if bias_GO is None else bias_GO.dtype
        return y_SO

    @staticmethod
    @first_order_only
    def backward(ctx, grad_SO):
        x_SI, weight_GIO, y_SO = ctx.saved_tensors
        grouping = ctx.grouping
        grad_SO = grad_SO.to(x_SI.dtype).contiguous()
        if ctx.relu:
            grad_SO = _relu_grad(grad_SO, y_SO)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_linear(grad_SO, weight_GIO, None, grouping, False, transpose=True)
        if ctx.needs_input_grad[1]:
            grad_w = grouped_wgrad(x_SI, grad_SO, grouping, weight_GIO.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = _bias_grad(grad_SO, grouping.key_S, grouping.num_groups, ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None


# torch.compile: the kernels as custom operators (a fake implementation for tracing, autograd
# registered), so that a compiled graph calls them as opaque operators instead of breaking at
# the Function above, whose launches dynamo cannot trace. Under the interpreter
# (``torch.library.wrap_triton`` passes interpreted kernels through untraced) this is the one
# form that traces on CPU and GPU alike. Eager calls keep the Function: no dispatcher in the
# way of the operator counts (ops/counting.py) or of the per-call cost.
_custom_op = getattr(torch.library, "custom_op", None)
COMPILABLE = _custom_op is not None and hasattr(torch.library, "register_autograd")

if COMPILABLE:
    @_custom_op("fairseq_smoe::grouped_linear", mutates_args=())
    def _linear_op(x_SI: torch.Tensor, weight_GIO: torch.Tensor, bias_GO: Optional[torch.Tensor],
                   counts_G: torch.Tensor, offs_G: torch.Tensor, key_S: torch.Tensor, relu: bool,
                   transpose: bool) -> torch.Tensor:
        return _linear(x_SI, weight_GIO, bias_GO, counts_G, offs_G, relu, transpose)

    @_linear_op.register_fake
    def _(x_SI, weight_GIO, bias_GO, counts_G, offs_G, key_S, relu, transpose):
        N = weight_GIO.shape[1] if transpose else weight_GIO.shape[2]
        return x_SI.new_empty(x_SI.shape[0], N)

    @_custom_op("fairseq_smoe::grouped_wgrad", mutates_args=())
    def _wgrad_op(x_SI: torch.Tensor, grad_SO: torch.Tensor, offs_G: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor:
        return _wgrad(x_SI, grad_SO, offs_G, out_dtype)

    @_wgrad_op.register_fake
    def _(x_SI, grad_SO, offs_G, out_dtype):
        return x_SI.new_empty(offs_G.shape[0], x_SI.shape[1], grad_SO.shape[1], dtype=out_dtype)

    def _linear_op_setup(ctx, inputs, output):
        x_SI, weight_GIO, bias_GO, counts_G, offs_G, key_S, relu, transpose = inputs
        ctx.save_for_backward(x_SI, weight_GIO, output if relu else None, counts_G, offs_G, key_S)
        ctx.relu, ctx.transpose = relu, transpose
        ctx.bias_dtype = None if bias_GO is None else bias_GO.dtype

    def _linear_op_backward(ctx, grad_SO):
        x_SI, weight_GIO, y_SO, counts_G, offs_G, key_S = ctx.saved_tensors
        if ctx.transpose:
            raise RuntimeError("fairseq_smoe::grouped_linear: no gradient for transpose=True "
                               "(the input gradient's own product)")
        grad_SO = grad_SO.to(x_SI.dtype).contiguous()
        if ctx.relu:
            grad_SO = _relu_grad(grad_SO, y_SO)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _linear_op(grad_SO, weight_GIO, None, counts_G, offs_G, key_S, False, True)
        if ctx.needs_input_grad[1]:
            grad_w = _wgrad_op(x_SI, grad_SO, offs_G, weight_GIO.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = _bias_grad(grad_SO, key_S, offs_G.shape[0], ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None

    _linear_op.register_autograd(_linear_op_backward, setup_context=_linear_op_setup)


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling()


class TritonBackend(ResidentBackend):
    name = "triton"

    def linear(self, x_SD, grouping, weight_GIO, bias_GO, relu):
        if COMPILABLE and _compiling():
            return _linear_op(x_SD.contiguous(), weight_GIO, bias_GO, grouping.counts_G,
                              grouping.offs_G, grouping.key_S, relu, False)
        return _GroupedLinear.apply(x_SD, weight_GIO, bias_GO, grouping, relu)
