"""``first_order_only``: the backward decorator of the layer's hand-written autograd Functions.

Their backward passes are written once, for first-order gradients (they reuse saved buffers and
run outside autograd). A second derivative through them (``torch.autograd.grad(...,
create_graph=True)``: gradient penalties, Hessian-vector products) is refused where it starts,
with what to do instead, rather than with torch's generic message at the second backward.
"""

import functools

import torch
from torch.autograd.function import once_differentiable

SECOND_ORDER = ("the MoE layer has first-order gradients only: backward with create_graph=True "
                "(double backward: gradient penalties, Hessian-vector products) cannot go through "
                "it. Compute such terms on parts of the model without MoE layers, or take the "
                "second-order term by finite differences of first-order gradients")


def first_order_only(backward):
    """``once_differentiable``, refusing a backward that builds a graph (create_graph=True)."""
    inner = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():  # autograd runs a backward in grad mode iff create_graph
            raise RuntimeError(SECOND_ORDER)
        return inner(ctx, *grads)

    return wrapper
