"""The ``loop`` backend's experts: one autograd Function, expert by expert (paper §2, §3).

The experts' parameters live in ``fairseq_smoe.modules.experts.FeedForwardExperts``; this is how
the loop backend runs them (``feed_forward``, ``feed_forward_and_combine``), from their stacked
weights and biases.

Weights of all experts are stored stacked, ``weights[l]`` is [E, in_l, out_l], so expert e's
slice ``weights[l][e]`` is a contiguous view: no per-step copy, no gather of weights.

The forward and backward run as one autograd Function over tokens already grouped by expert
(``loop_dispatch.group_by_expert``): each expert runs once on its contiguous block of rows, and in
backward its weight gradient is written straight into its slice of one preallocated gradient
tensor. Indexing the stacked weight inside a Python loop under autograd instead makes every
expert's backward allocate and add a full-size zero gradient (O(E²) memory traffic); this is
why the loop lives inside a Function. Experts with no rows cost nothing but zeroing their
gradient slice.

Per expert the Function issues only matrix products and one fused elementwise pass per layer:
forward ``addmm`` (bias folded in) + in-place ReLU; backward weight-gradient ``mm`` straight into
the gradient slice, bias-gradient ``sum`` straight into its slice, ``mm`` for the gradient of
the layer input into a scratch block, and ReLU' as one ``threshold_backward`` written in place.
Large tensors (hidden activations, outputs, gradients, scratch) come from a ``Workspace``
(workspace.py), so on CPU a training step does not page-fault fresh memory for them.

``recompute_activations`` (App. D) keeps only each expert's input and recomputes its hidden
activations in backward, trading one more forward matmul for the hidden-layer memory.

``feed_forward_and_combine`` runs the experts and the gate-weighted combine of eq. (1) as one
Function, so that backward gathers each expert's output gradient, forms the
gate gradient and scales by the gate inside the expert loop (on the expert threads, in cache)
instead of in separate passes over all rows. An expert with more than ``CHUNK_ROWS`` rows goes
through backward chunk by chunk, its weight gradient accumulated over the chunks, so per-thread
scratch stays bounded however unbalanced the routing (fp32/fp64 weights; half-precision ones
keep one product per expert so that their gradient is rounded once).
"""

from typing import Optional, Sequence

import torch

from . import threads
from .autograd import first_order_only
from .loop_dispatch import combine_rows
from .workspace import Workspace

_relu_backward_ = torch.ops.aten.threshold_backward.grad_input  # (grad, post-ReLU value, 0, out=)


def _segments(counts: Sequence[int]):
    """(expert, start, end) for each expert with at least one row."""
    start = 0
    for expert, count in enumerate(counts):
        if count:
            yield expert, start, start + count
        start += count


def _for_each_expert(work, counts: Sequence[int], device: torch.device) -> None:
    """Call ``work(part, expert, start, end)`` for every expert with rows, ``part`` being the
    index of the thread (for its scratch buffers).

    On CPU with T threads (threads.py) and at least 2·T busy experts, T threads take experts
    from one shared queue, most rows first (so the experts left at the end are short), each with
    single-threaded kernels: many experts' matrix products are small, and splitting each of them
    over T threads pays a thread barrier per product. Experts are independent (disjoint rows,
    their own weight and gradient slices), so no result depends on which thread ran which."""
    segments = list(_segments(counts))
    if threads.parts(device) < 2 or len(segments) < 2 * threads.parts(device):
        for expert, start, end in segments:  # few experts: multi-threaded kernels
            work(0, expert, start, end)
        return
    segments.sort(key=lambda seg: seg[1] - seg[2])  # most rows first (stable)
    threads.for_each_shared(len(segments), lambda part, i: work(part, *segments[i]), device)


def _expert_forward(x_rows, weights, biases, expert, hidden_out, y_out):
    """Run one expert on its rows: ``hidden_out[l]`` receives the post-ReLU activation of hidden
    layer l, ``y_out`` the output (all preallocated row blocks)."""
    h = x_rows
    last = len(weights) - 1
    for layer, (w, b) in enumerate(zip(weights, biases)):
        out = y_out if layer == last else hidden_out[layer]
        torch.addmm(b[expert], h, w[expert], out=out)
        if layer < last:
            out.relu_()
        h = out
    return h


class GroupedFeedForwardOptions:
    """What ``_GroupedFeedForward`` takes besides tensors: recompute flag and workspace."""

    def __init__(self, recompute: bool = False, workspace: Optional[Workspace] = None):
        self.recompute, self.workspace = recompute, workspace


def _empty(workspace: Optional[Workspace], name, shape, like: torch.Tensor) -> torch.Tensor:
    if workspace is None:
        return like.new_empty(shape)
    return workspace.empty(name, shape, like.dtype, like.device)


# Most rows an expert's backward (and a recomputed forward) handles at once: bounds the per-thread
# scratch to CHUNK_ROWS × width whatever the routing (one expert of MoE-4 sees ~8k rows of an
# 8k-token batch). Measured here: 512 is as fast as 2048 for MoE-4 and MoE-32 (the extra passes
# over the weight gradient are paid back by a scratch that stays in cache) and brings MoE-4's
# activation memory from 1.33 to 1.13 × dense at 2048 tokens.
CHUNK_ROWS = 512


def _chunk_rows(counts, dtype: torch.dtype) -> int:
    most = max(counts) if counts else 0
    if dtype.itemsize < 4:
        # Half-precision weights: a gradient summed over chunks would be rounded to 8 (bf16) or
        # 11 (fp16) bits after every chunk; one product accumulates in fp32 and rounds once.
        return most
    return min(most, CHUNK_ROWS)


def _experts_forward(x_SD, counts, options, weights, biases):
    """Every expert on its block of rows. Returns (y_SO, hidden activations per layer or None
    with ``recompute``)."""
    ws = options.workspace
    rows = x_SD.shape[0]
    y_SO = _empty(ws, "y_SO", (rows, weights[-1].shape[-1]), x_SD)
    widths = [w.shape[-1] for w in weights[:-1]]
    chunk = _chunk_rows(counts, x_SD.dtype)
    scratch = {}  # recompute: hidden activations live for one chunk of rows at a time, per thread
    hidden = None
    if options.recompute:  # allocate in this thread: the workspace is not thread-safe
        scratch.update({p: [_empty(ws, f"recompute{l}.{p}", (chunk, h), x_SD)
                            for l, h in enumerate(widths)] for p in range(threads.max_parts(x_SD.device))})
    else:
        # Post-ReLU activations of each hidden layer, kept for backward.
        hidden = [_empty(ws, f"hidden{l}", (rows, h), x_SD) for l, h in enumerate(widths)]

    def work(part, expert, start, end):
        if not options.recompute:
            hidden_rows = [h[start:end] for h in hidden]
            _expert_forward(x_SD[start:end], weights, biases, expert, hidden_rows, y_SO[start:end])
            return
        for c0 in range(start, end, chunk):
            c1 = min(c0 + chunk, end)
            hidden_rows = [h[: c1 - c0] for h in scratch[part]]
            _expert_forward(x_SD[c0:c1], weights, biases, expert, hidden_rows, y_SO[c0:c1])

    _for_each_expert(work, counts, x_SD.device)
    return y_SO, hidden


def _experts_backward(x_SD, counts, options, weights, biases, hidden, output_grad, need_input_grad,
                      grad_x_name="y_SO"):
    """Gradients of every expert, expert by expert. ``output_grad(part, expert, start, end)``
    returns the gradient of the expert's output rows (it may compute it there, in the expert's
    thread). Returns (grad_x_SD or None, weight gradients, bias gradients)."""
    ws = options.workspace
    num_layers = len(weights)
    # Without a fused combine the forward output y_SO is dead by now (the combine's backward,
    # its only reader, has run), so its buffer (``grad_x_name``) can take the input gradient; if
    # anything still holds it the workspace hands out a fresh one.
    grad_x_SD = _empty(ws, grad_x_name, x_SD.shape, x_SD) if need_input_grad else None
    grad_w = [_empty(ws, f"grad_w{l}", w.shape, w) for l, w in enumerate(weights)]
    grad_b = [_empty(ws, f"grad_b{l}", b.shape, b) for l, b in enumerate(biases)]
    widths = [w.shape[-1] for w in weights[:-1]]
    chunk = _chunk_rows(counts, x_SD.dtype)
    # Per thread: gradient w.r.t. the (post-ReLU) output of each hidden layer for one chunk of
    # rows at a time, and the recomputed activations. Allocated here, in this thread.
    scratch, recomputed = {}, {}
    for p in range(threads.max_parts(x_SD.device)):
        scratch[p] = [_empty(ws, f"scratch{l}.{p}", (chunk, h), x_SD) for l, h in enumerate(widths)]
        if options.recompute:
            recomputed[p] = [_empty(ws, f"recompute{l}.{p}", (chunk, h), x_SD)
                             for l, h in enumerate(widths)]

    def work(part, expert, start, end):
        # An expert with many rows goes chunk by chunk: the per-thread scratch stays bounded and
        # the weight and bias gradients add up over the chunks.
        for c0 in range(start, end, chunk):
            c1 = min(c0 + chunk, end)
            _chunk_backward(part, expert, c0, c1, first=c0 == start)

    def _chunk_backward(part, expert, start, end, first):
        n = end - start
        x_rows = x_SD[start:end]
        if options.recompute:
            acts = [h[:n] for h in recomputed[part]]
            h = x_rows
            for layer in range(num_layers - 1):
                torch.addmm(biases[layer][expert], h, weights[layer][expert], out=acts[layer])
                h = acts[layer].relu_()
        else:
            acts = [h[start:end] for h in hidden]
        inputs = [x_rows] + acts  # input of each layer
        g = output_grad(part, expert, start, end)
        for layer in reversed(range(num_layers)):
            if first:
                torch.mm(inputs[layer].t(), g, out=grad_w[layer][expert])
                torch.sum(g, dim=0, out=grad_b[layer][expert])
            else:
                grad_w[layer][expert].addmm_(inputs[layer].t(), g)
                grad_b[layer][expert].add_(g.sum(dim=0))
            w_t = weights[layer][expert].t()
            if layer > 0:
                g_in = scratch[part][layer - 1][:n]
                torch.mm(g, w_t, out=g_in)
                # ReLU'(pre-activation) is 1 exactly where the post-ReLU value is > 0.
                _relu_backward_(g_in, inputs[layer], 0, grad_input=g_in)
                g = g_in
            elif grad_x_SD is not None:
                torch.mm(g, w_t, out=grad_x_SD[start:end])

    _for_each_expert(work, counts, x_SD.device)
    for expert, count in enumerate(counts):
        if not count:  # buffers are uninitialised: experts without rows get 0
            for grad in grad_w + grad_b:
                grad[expert].zero_()
    return grad_x_SD, grad_w, grad_b


def _save(ctx, x_SD, params, hidden, *extra):
    ctx.num_layers, ctx.num_extra = len(params) // 2, len(extra)
    ctx.save_for_backward(x_SD, *extra, *params, *(hidden or []))


def _saved(ctx):
    saved = ctx.saved_tensors
    L, X = ctx.num_layers, ctx.num_extra
    x_SD, extra = saved[0], saved[1 : 1 + X]
    weights, biases = saved[1 + X : 1 + X + L], saved[1 + X + L : 1 + X + 2 * L]
    hidden = None if ctx.options.recompute else list(saved[1 + X + 2 * L :])
    return x_SD, extra, weights, biases, hidden


class _GroupedFeedForward(torch.autograd.Function):
    """y_SO = FFN_{expert(s)}(x_SD) for rows sorted by expert with ``counts`` rows each.

    ``apply(x_SD, counts, options, *weights, *biases)``."""

    @staticmethod
    def forward(ctx, x_SD, counts, options, *params):
        num_layers = len(params) // 2
        y_SO, hidden = _experts_forward(x_SD, counts, options, params[:num_layers], params[num_layers:])
        ctx.counts, ctx.options = counts, options
        _save(ctx, x_SD, params, hidden)
        return y_SO

    @staticmethod
    @first_order_only
    def backward(ctx, grad_y_SO):
        x_SD, _, weights, biases, hidden = _saved(ctx)
        grad_y_SO = grad_y_SO.contiguous().to(x_SD.dtype)
        grad_x_SD, grad_w, grad_b = _experts_backward(
            x_SD, ctx.counts, ctx.options, weights, biases, hidden,
            lambda part, expert, start, end: grad_y_SO[start:end], ctx.needs_input_grad[0])
        return (grad_x_SD, None, None, *grad_w, *grad_b)


class _GroupedFeedForwardCombine(torch.autograd.Function):
    """y_TO = Σ_s gate_S[s] · FFN_{expert(s)}(x_SD[s]) added into row row_S[s] (eq. 1): the experts
    and ``loop_dispatch.combine`` in one Function, so that backward gathers each expert's output
    gradient, the gate gradient ⟨∂L/∂y[row], E_i(x)⟩ and the gate-scaled gradient inside the
    expert loop (on the expert threads, in cache) instead of in three passes over all rows.

    ``apply(x_SD, gate_S, row_S, num_rows, counts, options, *weights, *biases)``."""

    @staticmethod
    def forward(ctx, x_SD, gate_S, row_S, num_rows, counts, options, *params):
        num_layers = len(params) // 2
        y_SO, hidden = _experts_forward(x_SD, counts, options, params[:num_layers], params[num_layers:])
        gate_dtype, gate_S = gate_S.dtype, gate_S.to(y_SO.dtype)
        y_TO = combine_rows(y_SO, row_S, gate_S, num_rows, options.workspace)
        ctx.counts, ctx.options, ctx.gate_dtype = counts, options, gate_dtype
        _save(ctx, x_SD, params, hidden, y_SO, gate_S, row_S)
        return y_TO

    @staticmethod
    @first_order_only
    def backward(ctx, grad_y_TO):
        x_SD, (y_SO, gate_S, row_S), weights, biases, hidden = _saved(ctx)
        grad_y_TO = grad_y_TO.contiguous().to(x_SD.dtype)
        O = y_SO.shape[1]
        chunk = _chunk_rows(ctx.counts, x_SD.dtype)
        grad_gate_S = y_SO.new_empty(y_SO.shape[0]) if ctx.needs_input_grad[1] else None
        rows_grad = {p: _empty(ctx.options.workspace, f"rows_grad.{p}", (chunk, O), y_SO)
                     for p in range(threads.max_parts(y_SO.device))}

        def output_grad(part, expert, start, end):
            # ∂L/∂y of this expert's rows; the gate's gradient is its dot with E_i(x).
            g = torch.index_select(grad_y_TO, 0, row_S[start:end], out=rows_grad[part][: end - start])
            if grad_gate_S is not None:
                torch.sum(g * y_SO[start:end], dim=1, out=grad_gate_S[start:end])
            return g.mul_(gate_S[start:end, None])

        grad_x_SD, grad_w, grad_b = _experts_backward(
            x_SD, ctx.counts, ctx.options, weights, biases, hidden, output_grad,
            ctx.needs_input_grad[0], grad_x_name="grad_x_SD")
        if grad_gate_S is not None:
            grad_gate_S = grad_gate_S.to(ctx.gate_dtype)
        return (grad_x_SD, grad_gate_S, None, None, None, None, *grad_w, *grad_b)


def _check_counts(x_SD: torch.Tensor, counts: Sequence[int], num_experts: int) -> None:
    if len(counts) != num_experts or sum(counts) != x_SD.shape[0]:
        raise ValueError(
            f"counts must list rows for each of the {num_experts} experts and add up to "
            f"{x_SD.shape[0]} rows; got {len(counts)} entries summing to {sum(counts)}"
        )


def feed_forward(x_SD: torch.Tensor, counts: Sequence[int], weights: Sequence[torch.Tensor],
                 biases: Sequence[torch.Tensor], recompute: bool = False,
                 workspace: Optional[Workspace] = None) -> torch.Tensor:
    """Every expert on its block of rows: ``counts[e]`` consecutive rows of x_SD (sorted by
    expert) through expert e of the stacked ``weights`` [E, I, O] and ``biases`` [E, O]. Runs
    in the weights' dtype (e.g. fp32 master weights under autocast); the output has x's."""
    _check_counts(x_SD, counts, weights[0].shape[0])
    rows_SD = x_SD.to(weights[0].dtype).contiguous()
    y_SO = _GroupedFeedForward.apply(rows_SD, tuple(counts), GroupedFeedForwardOptions(recompute, workspace),
                                     *weights, *biases)
    return y_SO.to(x_SD.dtype)


def feed_forward_and_combine(x_SD: torch.Tensor, counts: Sequence[int], row_S: torch.Tensor,
                             gate_S: torch.Tensor, num_rows: int, weights: Sequence[torch.Tensor],
                             biases: Sequence[torch.Tensor], recompute: bool = False,
                             workspace: Optional[Workspace] = None) -> torch.Tensor:
    """Σ_i G(x)_i · E_i(x) (eq. 1): ``feed_forward`` of the rows, each times ``gate_S``, added
    into row ``row_S`` of a [num_rows, O] result; the same as ``loop_dispatch.combine`` of
    ``feed_forward``, in one Function."""
    _check_counts(x_SD, counts, weights[0].shape[0])
    rows_SD = x_SD.to(weights[0].dtype).contiguous()
    y_TO = _GroupedFeedForwardCombine.apply(rows_SD, gate_S, row_S, num_rows, tuple(counts),
                                            GroupedFeedForwardOptions(recompute, workspace),
                                            *weights, *biases)
    return y_TO.to(x_SD.dtype)


def grouped_matmul(x_SD: torch.Tensor, counts: Sequence[int], weight_GIO: torch.Tensor,
                   workspace: Optional[Workspace] = None) -> torch.Tensor:
    """One linear map per block of rows, no bias: rows of block g (``counts[g]`` consecutive rows
    of x_SD) times ``weight_GIO[g]``. The hierarchical layer's secondary gate projections, one
    per group (App. B). Runs as the experts do (one product per block, blocks spread over the
    threads, hand-written backward) in the weights' dtype; differentiable in x and the weights."""
    if len(counts) != weight_GIO.shape[0] or sum(counts) != x_SD.shape[0]:
        raise ValueError(f"counts must give rows for each of the {weight_GIO.shape[0]} weights and add "
                         f"up to {x_SD.shape[0]} rows; got {list(counts)}")
    no_bias_GO = weight_GIO.new_zeros(weight_GIO.shape[0], weight_GIO.shape[2])
    return _GroupedFeedForward.apply(x_SD.to(weight_GIO.dtype).contiguous(), tuple(counts),
                                     GroupedFeedForwardOptions(False, workspace), weight_GIO,
                                     no_bias_GO)
