"""Noisy top-k gating and its smooth load, fused into one pass over blocks of rows (paper §2.1,
eq. 3-5 and 8-10).

For a block of rows with clean logits x·W_g and raw noise logits x·W_noise:

    std      = softplus(x·W_noise) + ε                          eq. (4), ε as in the reference code
    H        = x·W_g + N(0,1)·std                               eq. (4)
    G        = softmax(KeepTopK(H, k))                          eq. (3), (5)
    P(x, i)  = Φ(((x·W_g)_i − kth_excluding(H, k, i)) / std_i) eq. (8), (9)
    Load     = Σ_x P(x, ·)                                      eq. (10)

Written with autograd, this is about twenty passes over tokens × experts tensors forward and
backward, each a fresh allocation: at 32k tokens × 256 experts (32 MiB per tensor) they cost
more than the gate's matrix product and page-fault new memory at every step. Here the forward
reads the logits and the noise once and the backward the logits and the saved std, block by
block of rows, with every temporary small enough to stay in cache, and blocks run on the
intra-op threads side by side (threads.py). Backward recomputes z; H is differentiable only at
each row's k+1 top values, so only the noise there is kept. The gradients are the exact
derivatives of the formulas above, the same as autograd's (tests/test_formula_moe.py checks
them against autograd through ``balance.smooth_load``, tests/test_module_moe_layer.py the whole layer
against a dense reference).

Noise (``gate_noise``) is one ``torch.randn`` on the device's generator, the same for every expert
backend; ``torch.manual_seed`` makes it reproducible.

``route`` is what the gates call (modules/gating.py, modules/secondary_gates.py): it turns the
backend and the grouping of the rows into the plumbing arguments of ``noisy_top_k``.

Inside ``torch.compile`` the blocks, their ``out=`` writes, the reused buffers and the thread pool
cannot be traced: there ``noisy_top_k`` runs ``_NoisyTopKTraced``, the same formulas and backward
over all rows at once, which the compiler fuses (tests/test_module_compile.py holds it to the blocked
Function and a compiled layer step to the eager one).
"""

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import threads
from .autograd import first_order_only
from .workspace import Workspace

_INV_SQRT2 = 0.5**0.5
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# Elements per block of the fused pass (1 MiB per fp32 temporary): measured fastest here among
# 2^14..2^20 (smaller blocks pay per-operation overhead, larger ones fall out of cache).
_BLOCK_ELEMENTS = 1 << 18
_SOFTPLUS_THRESHOLD = 20.0  # F.softplus's default: linear above it


def _compiling() -> bool:
    """Inside a ``torch.compile`` trace (torch >= 2.3 can tell; older torch: never)."""
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling()


def _empty(workspace: Optional[Workspace], name, shape, dtype, device) -> torch.Tensor:
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return workspace.empty(name, shape, dtype, device)


def gate_noise(rows: int, num_experts: int, dtype: torch.dtype, device: torch.device,
               workspace: Optional[Workspace] = None) -> torch.Tensor:
    """N(0, 1) noise [rows, num_experts] for the noisy gate: one ``torch.randn`` on the device's
    generator (into a reused buffer on CPU), so every expert backend draws the same noise and no
    seed is read back to the host. On CPU it does not depend on the thread count (torch's CPU
    normal sampler is serial) and is as fast as the per-block generators it replaced."""
    if _compiling():  # the same draw, into a fresh tensor: compiled graphs own their memory
        return torch.randn((rows, num_experts), dtype=dtype, device=device)
    noise_TE = _empty(workspace, "noise", (rows, num_experts), dtype, torch.device(device))
    return torch.randn((rows, num_experts), dtype=dtype, device=device, out=noise_TE)


def _row_blocks(rows: int, num_experts: int, device: torch.device,
                segment_rows: Optional[Sequence[int]] = None) -> List[Tuple[int, range]]:
    """(segment, rows) blocks covering ``range(rows)``: cache-sized on CPU, one per segment on
    other devices; no block crosses the end of a segment (``segment_rows`` consecutive
    segments of rows, default one segment of all rows)."""
    step = max(16, _BLOCK_ELEMENTS // max(num_experts, 1)) if device.type == "cpu" else rows
    blocks, start = [], 0
    for segment, count in enumerate([rows] if segment_rows is None else segment_rows):
        end = start + count
        blocks += [(segment, range(a, min(a + step, end))) for a in range(start, end, max(step, 1))]
        start = end
    return blocks


# Up to this many values per row, repeated max + mask beats torch.topk (see ``_top``).
_MAX_REPEATED_MAX = 8


def _top(noisy, count, out_values, out_experts):
    """The ``count`` largest values of each row, descending, and their columns, into the outputs;
    destroys ``noisy``. For a few values out of many, ``count`` passes of a row max (each
    largest is then masked with −inf) are ~1.8× faster on CPU than ``torch.topk`` (measured on
    1024 × 256 blocks, k + 1 = 5: 2.0 ms vs 3.7 ms). Ties come out in distinct columns, as with
    topk."""
    if count > _MAX_REPEATED_MAX:
        torch.topk(noisy, count, dim=1, out=(out_values, out_experts))
        return
    for j in range(count):
        values, experts = noisy.max(dim=1, keepdim=True)
        out_values[:, j : j + 1] = values
        out_experts[:, j : j + 1] = experts
        if j + 1 < count:
            noisy.scatter_(1, experts, float("-inf"))


def _margin(clean, std, top_values, top_experts, k):
    """z of eq. (9) for one block: z = (clean − kth_excluding(H, k, i)) / std.

    kth_excluding is the k-th largest H for an expert outside the top k and the (k+1)-th for
    one of the k inside: z is computed against the k-th for every expert, then rewritten at the
    k top positions only. (With tied H the two bars are equal, so the choice of which tied
    expert counts as "inside" does not change z.) No tokens × experts mask is ever built:
    comparisons into bool tensors and ``where`` on them are several times slower than float
    arithmetic on CPU (measured: ``where`` on a 256 × 256 block ~350 µs, a subtraction ~15 µs)."""
    kth, kth_plus_one = top_values[:, k - 1 : k], top_values[:, k : k + 1]
    inside = top_experts[:, :k]
    z = torch.sub(clean, kth).div_(std)
    z_inside = clean.gather(1, inside).sub_(kth_plus_one).div_(std.gather(1, inside))
    return z.scatter_(1, inside, z_inside)


class _NoisyTopK(torch.autograd.Function):
    """(gate_TK, expert_TK, load_GE) from logits_T2E = x·[W_g | W_noise] and noise_TE; the load
    is summed per segment of rows (``segment_rows``, G segments)."""

    @staticmethod
    def forward(ctx, logits_T2E, noise_TE, valid_T, k, eps, workspace, segment_rows, single_pass,
                segment_T, num_segments):
        T, E = noise_TE.shape
        dtype, device = logits_T2E.dtype, logits_T2E.device
        top_values_TK1 = torch.empty(T, k + 1, dtype=dtype, device=device)
        top_experts_TK1 = torch.empty(T, k + 1, dtype=torch.long, device=device)
        top_noise_TK1 = torch.empty(T, k + 1, dtype=dtype, device=device)
        gate_TK = torch.empty(T, k, dtype=dtype, device=device)
        std_TE = _empty(workspace, "std", (T, E), dtype, device)  # saved: softplus is costly
        blocks = [(0, range(0, T))] if single_pass else _row_blocks(T, E, device, segment_rows)
        load_RE = torch.zeros(max(len(blocks), 1), E, dtype=dtype, device=device)
        # Segments given on the device: the load of row t goes to segment segment_T[t]
        # (num_segments = dropped).
        load_GE = None if segment_T is None else load_RE.new_zeros(num_segments + 1, E)

        def work(b, block):
            r = slice(block[1].start, block[1].stop)
            clean, raw = logits_T2E[r, :E], logits_T2E[r, E:]
            std = torch.add(F.softplus(raw), eps, out=std_TE[r])  # eq. (4)
            noisy = torch.addcmul(clean, noise_TE[r], std)
            # KeepTopK (eq. 5); the (k+1)-th value is the load estimator's other bar.
            top_values, top_experts = top_values_TK1[r], top_experts_TK1[r]
            _top(noisy, k + 1, top_values, top_experts)
            gate_TK[r] = torch.softmax(top_values[:, :k], dim=1)  # softmax over the kept k
            # H is differentiable only where it was kept (the top k+1): keep that noise alone.
            torch.gather(noise_TE[r], 1, top_experts, out=top_noise_TK1[r])
            z = _margin(clean, std, top_values, top_experts, k)
            prob = z.mul_(-_INV_SQRT2).erfc_().mul_(0.5)  # Φ(z) = erfc(−z/√2)/2, eq. (9)
            if valid_T is not None:
                prob.mul_(valid_T[r, None])
            if load_GE is not None:
                load_GE.index_add_(0, segment_T[r], prob)
            else:
                torch.sum(prob, dim=0, out=load_RE[b])  # this block's share of eq. (10)

        threads.for_each(blocks, work, device)
        if load_GE is not None:
            load_GE = load_GE[:num_segments]
        elif single_pass:
            load_GE = load_RE
        else:
            num_segments = 1 if segment_rows is None else len(segment_rows)
            block_segment_R = torch.tensor([seg for seg, _ in blocks] or [0], device=device)
            load_GE = load_RE.new_zeros(num_segments, E).index_add_(0, block_segment_R, load_RE)
        ctx.save_for_backward(logits_T2E, std_TE, top_values_TK1, top_experts_TK1, top_noise_TK1,
                              gate_TK, valid_T, segment_T)
        ctx.k, ctx.workspace, ctx.segment_rows = k, workspace, segment_rows
        ctx.single_pass = single_pass
        expert_TK = top_experts_TK1[:, :k]
        ctx.mark_non_differentiable(expert_TK)
        return gate_TK, expert_TK, load_GE

    @staticmethod
    @first_order_only
    def backward(ctx, grad_gate_TK, _grad_expert, grad_load_GE):
        (logits_T2E, std_TE, top_values_TK1, top_experts_TK1, top_noise_TK1, gate_TK,
         valid_T, segment_T) = ctx.saved_tensors
        k = ctx.k
        T, E = std_TE.shape
        device = logits_T2E.device
        grad_T2E = _empty(ctx.workspace, "grad_logits", logits_T2E.shape, logits_T2E.dtype, device)
        grad_load_GE = grad_load_GE.to(logits_T2E.dtype)
        if segment_T is not None:  # each row's segment's load gradient; dropped rows get 0
            grad_load_GE = torch.cat([grad_load_GE, grad_load_GE.new_zeros(1, E)])

        def work(b, block):
            segment, r = block[0], slice(block[1].start, block[1].stop)
            if segment_T is not None:
                grad_load_1E = grad_load_GE.index_select(0, segment_T[r])
            else:
                grad_load_1E = grad_load_GE[segment : segment + 1]
            clean, raw, std = logits_T2E[r, :E], logits_T2E[r, E:], std_TE[r]
            top_experts = top_experts_TK1[r]
            z = _margin(clean, std, top_values_TK1[r], top_experts, k)
            # Load: dP/dz = φ(z), z = (clean − bar) / std.
            grad_z = z.square().mul_(-0.5).exp_().mul_(grad_load_1E).mul_(_INV_SQRT_2PI)
            if valid_T is not None:
                grad_z.mul_(valid_T[r, None])
            grad_clean = torch.div(grad_z, std, out=grad_T2E[r, :E])
            grad_std = z.mul_(grad_clean).neg_()  # d/dstd of (clean − bar)/std = −z/std
            # d/dbar = −grad_clean: to the (k+1)-th value from the k experts inside the top k,
            # to the k-th value from all the others.
            grad_bar_inside = grad_clean.gather(1, top_experts[:, :k]).sum(1).neg_()
            grad_bar_outside = grad_clean.sum(1).neg_().sub_(grad_bar_inside)
            # Gate: softmax backward over the kept k values.
            gate, grad_gate = gate_TK[r], grad_gate_TK[r]
            grad_top = torch.zeros_like(top_values_TK1[r])
            torch.mul(gate, grad_gate - (grad_gate * gate).sum(1, keepdim=True), out=grad_top[:, :k])
            grad_top[:, k - 1].add_(grad_bar_outside)
            grad_top[:, k].add_(grad_bar_inside)
            # The top values are H = clean + noise·std at k+1 distinct experts: their gradient
            # reaches the clean logits there and, times the noise, the std.
            grad_clean.scatter_add_(1, top_experts, grad_top)
            grad_std.scatter_add_(1, top_experts, grad_top.mul_(top_noise_TK1[r]))
            torch.ops.aten.softplus_backward.grad_input(
                grad_std, raw, 1.0, _SOFTPLUS_THRESHOLD, grad_input=grad_T2E[r, E:])

        blocks = [(0, range(0, T))] if ctx.single_pass else _row_blocks(T, E, device, ctx.segment_rows)
        threads.for_each(blocks, work, device)
        return grad_T2E, None, None, None, None, None, None, None, None, None


class _NoisyTopKTraced(torch.autograd.Function):
    """``_NoisyTopK`` for ``torch.compile``: the same formulas and hand-written backward over all
    rows at once, each result a new tensor. The blocked Function above writes its blocks with
    ``out=`` into slices of preallocated outputs (which dynamo rejects in backward, where the
    slices are not contiguous), draws buffers from the workspace and runs blocks on the thread
    pool, none of which a graph can hold; a compiler fuses the whole-row passes instead. The load
    is summed per segment ``segment_T`` (None: one segment of all rows), shaped [G, E]."""

    @staticmethod
    def forward(ctx, logits_T2E, noise_TE, valid_T, segment_T, k, eps, num_segments):
        E = noise_TE.shape[1]
        clean, raw = logits_T2E[:, :E], logits_T2E[:, E:]
        std_TE = F.softplus(raw) + eps  # eq. (4)
        noisy = torch.addcmul(clean, noise_TE, std_TE)
        # KeepTopK (eq. 5); the (k+1)-th value is the load estimator's other bar.
        top_values_TK1, top_experts_TK1 = noisy.topk(k + 1, dim=1)
        gate_TK = torch.softmax(top_values_TK1[:, :k], dim=1)
        top_noise_TK1 = noise_TE.gather(1, top_experts_TK1)
        z = _margin(clean, std_TE, top_values_TK1, top_experts_TK1, k)
        prob = torch.erfc(z * -_INV_SQRT2) * 0.5  # Φ(z), eq. (9)
        if valid_T is not None:
            prob = prob * valid_T[:, None]
        if segment_T is None:
            load_GE = prob.sum(0, keepdim=True)  # eq. (10)
        else:
            load_GE = prob.new_zeros(num_segments + 1, E).index_add(0, segment_T, prob)[:num_segments]
        ctx.save_for_backward(logits_T2E, std_TE, top_values_TK1, top_experts_TK1, top_noise_TK1,
                              gate_TK, valid_T, segment_T)
        ctx.k = k
        expert_TK = top_experts_TK1[:, :k]
        ctx.mark_non_differentiable(expert_TK)
        return gate_TK, expert_TK, load_GE

    @staticmethod
    def backward(ctx, grad_gate_TK, _grad_expert, grad_load_GE):
        (logits_T2E, std_TE, top_values_TK1, top_experts_TK1, top_noise_TK1, gate_TK,
         valid_T, segment_T) = ctx.saved_tensors
        k = ctx.k
        E = std_TE.shape[1]
        clean, raw = logits_T2E[:, :E], logits_T2E[:, E:]
        grad_load_GE = grad_load_GE.to(logits_T2E.dtype)
        if segment_T is not None:  # each row's segment's load gradient; dropped rows get 0
            grad_load_GE = torch.cat([grad_load_GE, grad_load_GE.new_zeros(1, E)]).index_select(0, segment_T)
        z = _margin(clean, std_TE, top_values_TK1, top_experts_TK1, k)
        grad_z = torch.exp(z.square() * -0.5) * grad_load_GE * _INV_SQRT_2PI  # dP/dz = φ(z)
        if valid_T is not None:
            grad_z = grad_z * valid_T[:, None]
        grad_clean = grad_z / std_TE
        grad_std = -(z * grad_clean)
        # d/dbar = −grad_clean: to the (k+1)-th value from the experts inside the top k, to the
        # k-th from all the others (as in _NoisyTopK.backward).
        grad_bar_inside = -grad_clean.gather(1, top_experts_TK1[:, :k]).sum(1)
        grad_bar_outside = -grad_clean.sum(1) - grad_bar_inside
        grad_kept = gate_TK * (grad_gate_TK - (grad_gate_TK * gate_TK).sum(1, keepdim=True))
        grad_top = torch.cat([grad_kept[:, : k - 1], (grad_kept[:, k - 1] + grad_bar_outside)[:, None],
                              grad_bar_inside[:, None]], dim=1)
        grad_clean = grad_clean.scatter_add(1, top_experts_TK1, grad_top)
        grad_std = grad_std.scatter_add(1, top_experts_TK1, grad_top * top_noise_TK1)
        grad_raw = torch.ops.aten.softplus_backward(grad_std, raw, 1.0, _SOFTPLUS_THRESHOLD)
        return torch.cat([grad_clean, grad_raw], dim=1), None, None, None, None, None, None


def noisy_top_k(logits_T2E: torch.Tensor, noise_TE: torch.Tensor, valid_T: Optional[torch.Tensor],
                k: int, noise_epsilon: float, workspace: Optional[Workspace] = None,
                segment_rows: Optional[Sequence[int]] = None, single_pass: bool = False,
                segment_T: Optional[torch.Tensor] = None, num_segments: int = 0):
    """Noisy top-k gate values, experts and smooth load (eq. 3-5, 8-10) for k < n.

    ``logits_T2E`` is x·[W_g | W_noise] (float32 or float64), ``noise_TE`` N(0,1) draws (see
    ``gate_noise``), ``valid_T`` bool (False = padding: no load) or None. Returns
    (gate_TK, expert_TK, load_E); gate_TK and load_E are differentiable w.r.t. the logits.

    With ``segment_rows`` (counts of consecutive rows adding up to T) the rows are G separate
    batches gated alike, e.g. the X^(i) of a hierarchical layer's groups (App. B), and the load
    is per segment: load_GE [G, E]. ``segment_T`` (long [T], values 0..G, G = dropped) with
    ``num_segments`` = G says the same from the device, read by no host code; ``single_pass``
    runs all rows as one block (the device-resident path: kernels per step independent of T)."""
    E = noise_TE.shape[1]
    if not 0 < k < E:
        raise ValueError(f"noisy_top_k needs 0 < k < number of experts; got k={k}, {E} experts")
    if logits_T2E.shape != (noise_TE.shape[0], 2 * E):
        raise ValueError(f"logits must be [{noise_TE.shape[0]}, {2 * E}] for noise {list(noise_TE.shape)};"
                         f" got {list(logits_T2E.shape)}")
    if segment_T is not None:
        single_pass = True
    elif segment_rows is not None:
        segment_rows = tuple(int(n) for n in segment_rows)
        if min(segment_rows, default=0) < 0 or sum(segment_rows) != noise_TE.shape[0]:
            raise ValueError(f"segment_rows must be row counts >= 0 adding up to the "
                             f"{noise_TE.shape[0]} rows; got {list(segment_rows)}")
    if valid_T is not None:
        valid_T = valid_T.to(logits_T2E.dtype)
    if _compiling():
        if segment_rows is not None:
            counts = torch.tensor(segment_rows, device=logits_T2E.device)
            segment_T = torch.repeat_interleave(torch.arange(len(segment_rows), device=logits_T2E.device),
                                                counts, output_size=noise_TE.shape[0])
            num_segments = len(segment_rows)
        gate_TK, expert_TK, load_GE = _NoisyTopKTraced.apply(
            logits_T2E.contiguous(), noise_TE.to(logits_T2E.dtype).contiguous(), valid_T, segment_T, k,
            noise_epsilon, num_segments)
        return gate_TK, expert_TK, load_GE[0] if segment_T is None else load_GE
    gate_TK, expert_TK, load_GE = _NoisyTopK.apply(
        logits_T2E.contiguous(), noise_TE.to(logits_T2E.dtype).contiguous(), valid_T, k,
        noise_epsilon, workspace, segment_rows, single_pass, segment_T, num_segments)
    return gate_TK, expert_TK, load_GE[0] if segment_rows is None and segment_T is None else load_GE


def route(logits_T2E: torch.Tensor, noise_TE: torch.Tensor, valid_T: Optional[torch.Tensor], k: int,
          noise_epsilon: float, workspace: Optional[Workspace] = None, backend=None, segments=None):
    """``noisy_top_k`` run the way ``backend`` routes (an ops backend; None: the loop's way).

    ``segments`` (a ``Grouping``, or None for one batch of all rows) makes the rows separate
    batches, group after group, with the load [G, E] per group: from its host counts on the loop
    backend (blocks never cross a group's end), from each row's group on the device on the
    resident ones. The resident backends run all rows as one block, so the number of kernels
    does not depend on the number of rows and no host data is copied to the device."""
    resident = backend is not None and backend.resident
    if segments is None:
        return noisy_top_k(logits_T2E, noise_TE, valid_T, k, noise_epsilon, workspace,
                           single_pass=resident)
    if resident:
        return noisy_top_k(logits_T2E, noise_TE, valid_T, k, noise_epsilon, workspace,
                           segment_T=segments.group_S, num_segments=segments.num_groups)
    return noisy_top_k(logits_T2E, noise_TE, valid_T, k, noise_epsilon, workspace,
                       segment_rows=segments.counts)
