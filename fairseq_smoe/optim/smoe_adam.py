"""``--optimizer smoe_adam``: Adam for the shared parameters, the App. D variant for experts.

Appendix D of the paper keeps the largest models in memory with an Adam that, for the expert
weights, stores no first moment (β1 = 0) and a *factored* second moment. For one expert's
weight matrix W ∈ R^{n×m} with gradient g, two running averages are kept instead of the n·m
of Adam's v:

    R_t = β2·R_{t-1} + (1-β2)·Σ_j g_ij²        (row sums, n values)
    C_t = β2·C_{t-1} + (1-β2)·Σ_i g_ij²        (column sums, m values)
    V̂_ij = R_i·C_j / Σ_i R_i                   (outer product over the total)

(the paper states it with row and column *means* divided by the mean of either: the same V̂).
The update is Adam's with β1 = 0 and V̂ in place of v, bias-corrected like Adam's:

    W ← W·(1 - lr·wd) - lr·√(1-β2^t) · g / (√V̂ + ε)

Expert vectors (biases) keep an unfactored v (β1 = 0 still). Every other parameter gets
fairseq's Adam exactly (``fairseq.optim.adam.Adam``: decoupled weight decay, ε added to the
uncorrected √v, the same bias corrections), so shared-parameter updates are the ones ``--optimizer
adam`` makes. ``--moe-expert-moments full`` gives the experts that Adam too.

Expert tensors are the parameters of ``FeedForwardExperts`` (marked ``moe_expert_dim = 0`` at
construction): weights ``[E, d_in, d_out]`` are factored per expert, over each ``[d_in, d_out]``
slice (rows ``exp_avg_sq_row [E, d_in]``, columns ``exp_avg_sq_col [E, d_out]``); biases
``[E, d_out]`` keep ``exp_avg_sq [E, d_out]``. All state tensors have the expert as leading
dimension, so expert-parallel checkpoints shard, merge and reshard it like the weights; the
step counts are plain ints. State is fp32 whatever the parameters' dtype (``--memory-efficient-
fp16``); fp16 master weights (``--fp16``) must not be flattened into one tensor (the factored
structure would be lost): that is refused with the fix named.

Every tensor is updated in blocks of its leading dimension (whole experts for expert tensors)
so that the temporaries (g², √V̂, Adam's √v + ε) stay small (``CHUNK_ELEMENTS``) next to a
billion expert weights or a 793k-word embedding.
"""

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, List

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.optim import FairseqOptimizer, register_optimizer
from omegaconf import II, OmegaConf

EXPERT_MOMENTS = ChoiceEnum(["factored", "full"])
EXPERT_DIM_ATTR = "moe_expert_dim"  # set on FeedForwardExperts parameters: the expert dimension
CHUNK_ELEMENTS = 1 << 24  # most elements of one block of a tensor updated at once (64 MB of fp32)
_HALF = (torch.float16, torch.bfloat16)


def is_expert_param(p: torch.Tensor) -> bool:
    """A stacked expert tensor (expert = leading dimension) of ``FeedForwardExperts``."""
    return getattr(p, EXPERT_DIM_ATTR, None) == 0 and p.dim() >= 2


def state_elements(p: torch.Tensor, expert_moments: str = "factored") -> int:
    """Elements of optimizer state ``smoe_adam`` keeps for ``p`` (step counts aside); for memory
    accounting without building the optimizer (``p`` may be on the meta device)."""
    if expert_moments == "factored" and is_expert_param(p):
        if p.dim() >= 3:  # rows + columns of each expert matrix
            return p.shape[:-2].numel() * (p.shape[-2] + p.shape[-1])
        return p.numel()  # expert vectors: second moment only
    return 2 * p.numel()  # Adam: first and second moments


@dataclass
class SmoeAdamConfig(FairseqDataclass):
    adam_betas: Any = field(default=(0.9, 0.999), metadata={"help": "betas for Adam (β1 is 0 "
                                                                  "for expert parameters)"})
    adam_eps: float = field(default=1e-8, metadata={"help": "epsilon for Adam"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay (AdamW)"})
    moe_expert_moments: EXPERT_MOMENTS = field(
        default="factored",
        metadata={"help": "expert parameters: 'factored' (App. D: no first moment, row/column "
                          "second moments per expert matrix) or 'full' (plain Adam)"})
    lr: List[float] = II("optimization.lr")


class SmoeAdamW(torch.optim.Optimizer):
    """The torch optimizer behind ``--optimizer smoe_adam`` (see the module docstring).

    ``expert_moments`` is an attribute of the optimizer, not of its parameter groups, so that a
    checkpoint's saved groups cannot switch it."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 expert_moments="factored"):
        if expert_moments not in ("factored", "full"):
            raise ValueError(f"--moe-expert-moments must be 'factored' or 'full', got {expert_moments!r}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"--adam-betas must lie in [0, 1), got {tuple(betas)}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.expert_moments = expert_moments

    @property
    def supports_memory_efficient_fp16(self):
        return True

    @property
    def supports_flat_params(self):
        return self.expert_moments == "full"

    def factored(self, p: torch.Tensor) -> bool:
        """Whether ``p`` gets the App. D update."""
        return self.expert_moments == "factored" and is_expert_param(p)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("smoe_adam does not support sparse gradients")
                if self.factored(p):
                    self._expert_step(p, group)
                else:
                    self._adam_step(p, group)
        return loss

    def _adam_step(self, p, group):
        """fairseq's Adam (fairseq/optim/adam.py): the same elementwise operations in the same
        order, in blocks of rows (bit for bit the same, with bounded temporaries)."""
        half = p.data.dtype in _HALF
        state = self.state[p]
        if len(state) == 0:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p.data, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p.data, dtype=torch.float32)
        else:
            _check_layout(state, ("exp_avg", "exp_avg_sq"), "full", p)
            for name in ("exp_avg", "exp_avg_sq"):
                state[name] = state[name].to(device=p.device, dtype=torch.float32)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        bias_correction1 = 1 - beta1 ** state["step"]
        bias_correction2 = 1 - beta2 ** state["step"]
        step_size = group["lr"] * math.sqrt(bias_correction2) / bias_correction1
        for s in _blocks(p):
            grad = p.grad[s].float() if p.grad.dtype in _HALF else p.grad[s]
            w = p.data[s]
            w32 = w.float() if half else w
            exp_avg, exp_avg_sq = state["exp_avg"][s], state["exp_avg_sq"][s]
            exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = exp_avg_sq.sqrt().add_(group["eps"])
            if group["weight_decay"] != 0:
                w32.add_(w32, alpha=-group["weight_decay"] * group["lr"])
            w32.addcdiv_(exp_avg, denom, value=-step_size)
            if half:
                w.copy_(w32)

    def _expert_step(self, p, group):
        """App. D: β1 = 0; factored v per expert matrix, full v for expert vectors."""
        matrix = p.dim() >= 3
        names = ("exp_avg_sq_row", "exp_avg_sq_col") if matrix else ("exp_avg_sq",)
        state = self.state[p]
        if len(state) == 0:
            state["step"] = 0
            if matrix:
                state["exp_avg_sq_row"] = p.new_zeros(p.shape[:-1], dtype=torch.float32)
                state["exp_avg_sq_col"] = p.new_zeros(p.shape[:-2] + p.shape[-1:], dtype=torch.float32)
            else:
                state["exp_avg_sq"] = p.new_zeros(p.shape, dtype=torch.float32)
        else:
            _check_layout(state, names, "factored", p)
            for name in names:
                state[name] = state[name].to(device=p.device, dtype=torch.float32)
        beta2 = group["betas"][1]
        state["step"] += 1
        step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"])
        decay = group["weight_decay"] * group["lr"]
        eps = group["eps"]
        for s in _blocks(p):  # whole experts
            w = p.data[s]
            w32 = w.float() if w.dtype in _HALF else w
            g = p.grad[s].float() if p.grad.dtype in _HALF else p.grad[s]
            g2 = g * g
            if matrix:
                row, col = state["exp_avg_sq_row"][s], state["exp_avg_sq_col"][s]
                row.mul_(beta2).add_(g2.sum(dim=-1), alpha=1 - beta2)
                col.mul_(beta2).add_(g2.sum(dim=-2), alpha=1 - beta2)
                # √V̂ = √(R / ΣR) ⊗ √C; an expert that never had a gradient has R = C = 0
                total = row.sum(dim=-1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny)
                denom = torch.mul(row.div(total).sqrt_().unsqueeze(-1), col.sqrt().unsqueeze(-2),
                                  out=g2)
            else:
                v = state["exp_avg_sq"][s]
                v.mul_(beta2).add_(g2, alpha=1 - beta2)
                denom = torch.sqrt(v, out=g2)
            denom.add_(eps)
            if decay != 0:
                w32.add_(w32, alpha=-decay)
            w32.addcdiv_(g, denom, value=-step_size)
            if w32 is not w:
                w.copy_(w32)


def _blocks(p: torch.Tensor):
    """Index of consecutive blocks of ``p``'s leading dimension, at most ``CHUNK_ELEMENTS``
    elements each (one row/expert at least); ``...`` for scalars."""
    if p.dim() == 0:
        yield ...
        return
    rows = max(1, CHUNK_ELEMENTS // max(1, p[0].numel()))
    for first in range(0, p.shape[0], rows):
        yield slice(first, first + rows)


def _check_layout(state, names, mode, p) -> None:
    if not all(name in state for name in names):
        other = "full" if mode == "factored" else "factored"
        raise ValueError(
            f"the optimizer state of a parameter of shape {list(p.shape)} was saved with "
            f"--moe-expert-moments {other}; resume with --moe-expert-moments {other}, or pass "
            f"--reset-optimizer to start new moments")


@register_optimizer("smoe_adam", dataclass=SmoeAdamConfig)
class SmoeAdam(FairseqOptimizer):
    """Adam with the App. D expert update (``fairseq_smoe.optim.smoe_adam``)."""

    def __init__(self, cfg: SmoeAdamConfig, params):
        super().__init__(cfg)
        self._optimizer = SmoeAdamW(params, expert_moments=str(cfg.moe_expert_moments),
                                    **self.optimizer_config)

    @property
    def optimizer_config(self):
        lr = self.cfg.lr[0] if isinstance(self.cfg.lr, Collection) else self.cfg.lr
        betas = self.cfg.adam_betas
        betas = eval(betas) if isinstance(betas, str) else OmegaConf.to_container(betas) \
            if OmegaConf.is_config(betas) else betas
        return {"lr": lr, "betas": tuple(betas), "eps": self.cfg.adam_eps,
                "weight_decay": self.cfg.weight_decay}


_FLAT_ERROR = ("--optimizer smoe_adam factors the experts' second moments per expert matrix, "
               "which --fp16/--bf16's flattened fp32 copy of all parameters cannot keep; add "
               "--fp16-no-flatten-grads, use --memory-efficient-fp16, or pass "
               "--moe-expert-moments full")


def install_fp16_hook() -> None:
    """fairseq's FP16Optimizer makes fp32 master copies of the parameters: copy our expert mark
    onto them (non-flat); refuse one flat copy of experts for factored moments. Idempotent."""
    from fairseq.optim.fp16_optimizer import _FP16OptimizerMixin

    original = _FP16OptimizerMixin.__dict__["build_fp32_params"].__func__
    if getattr(original, "_smoe", False):
        return

    def build_fp32_params(cls, args, params, flatten=True):
        params = list(params)
        experts = [getattr(p, EXPERT_DIM_ATTR, None) for p in params]
        if flatten and any(e is not None for e in experts) \
                and getattr(args, "_name", None) == "smoe_adam" \
                and getattr(args, "moe_expert_moments", "factored") == "factored":
            raise ValueError(_FLAT_ERROR)
        fp32_params = original(cls, args, params, flatten=flatten)
        if not flatten:
            for p32, expert_dim in zip(fp32_params, experts):
                if expert_dim is not None:
                    setattr(p32, EXPERT_DIM_ATTR, expert_dim)
        return fp32_params

    build_fp32_params._smoe = True
    _FP16OptimizerMixin.build_fp32_params = classmethod(build_fp32_params)
