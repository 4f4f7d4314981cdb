"""The Sparsely-Gated Mixture-of-Experts layer (paper §2, eq. 1).

    y = Σ_i G(x)_i · E_i(x)        E_i(x) is computed only where G(x)_i ≠ 0

Pure PyTorch, usable in any model:

    moe = MoELayer(512, 512, num_experts=32, hidden_dim=1024, k=4)
    y, stats = moe(x, padding_mask)      # x [..., 512] → y [..., 512]; mask True = padding
    loss = task_loss + stats.loss

Each forward treats every position of x as one example (the "convolutional" batch of §3.1):
the gate routes each non-padding position, and the layer's expert backend (fairseq_smoe/ops)
groups the assignments by expert, runs each expert once on its group and adds the gate-weighted
outputs back. Padding positions are never routed, never counted, and come out as 0.
"""

import math
from typing import Callable, Optional

import torch
import torch.nn as nn

from .. import ops
from ..ops.workspace import Workspace
from .experts import FeedForwardExperts
from .gating import GATING_MODES, NoisyTopKGate, build_gate
from .stats import MoEStats, balance_losses, count_unrouted


def _this_worker_only(totals: torch.Tensor) -> torch.Tensor:
    """``sum_over_workers`` of a single process (a named function, so layers pickle)."""
    return totals


def _all_experts_here(backend):
    """``wrap_backend`` of a single process: the backend runs all experts itself."""
    return backend


def run_gate(gate: nn.Module, x_TD: torch.Tensor, valid_T: Optional[torch.Tensor], backend):
    """G(x) of ``gate``; the noisy top-k gates' fused routing pass runs the backend's way."""
    if isinstance(gate, NoisyTopKGate):
        return gate(x_TD, valid_T, backend)
    return gate(x_TD, valid_T)


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


def check_layer_args(gating: str, noise_epsilon: float, w_importance: float, w_load: float, **sizes):
    for name, value in sizes.items():
        check_positive_int(name, value)
    if gating not in GATING_MODES:
        raise ValueError(f"gating must be one of {', '.join(GATING_MODES)}; got {gating!r}")
    if gating == "noisy_top_k" and not 0 <= noise_epsilon < math.inf:
        raise ValueError(f"noise_epsilon must be finite and >= 0; got {noise_epsilon!r}")
    for name, value in (("w_importance", w_importance), ("w_load", w_load)):
        if not 0 <= value < math.inf:
            raise ValueError(f"{name} must be finite and >= 0 (0 disables that loss); got {value!r}")


def check_k(name: str, k: int, num_experts: int, experts_name: str) -> None:
    check_positive_int(name, k)
    if k > num_experts:
        raise ValueError(f"{name}={k} is larger than {experts_name}={num_experts}; "
                         f"choose {name} <= {experts_name}")


def _as_device_count(count, device) -> torch.Tensor:
    """A row count as a 0-dim long tensor on ``device``. A Python int is written by a fill
    kernel (its value travels as a kernel argument), not copied from the host as
    ``torch.as_tensor(int, device=...)`` would: that copy waits for the device on CUDA."""
    if isinstance(count, torch.Tensor):
        return count.to(device=device, dtype=torch.long)
    return torch.full((), count, dtype=torch.long, device=device)


class MoELayerBase(nn.Module):
    """What flat and hierarchical layers share: input flattening, the experts' parameters
    (``self.experts``), handing the assignments to the expert backend, and the balance
    statistics.

    ``backend`` says how the experts and the routing around them run (fairseq_smoe/ops):
    "loop", "grouped_mm", "triton", or "auto" (loop on CPU; on CUDA grouped_mm for bf16 on
    compute capability 9.x, else triton); None: ``SMOE_EXPERTS_BACKEND``, else "auto".
    """

    def __init__(self, input_dim: int, output_dim: int, num_experts: int, hidden_dim: int,
                 num_hidden_layers: int, w_importance: float, w_load: float,
                 recompute_activations: bool, backend: Optional[str] = None):
        super().__init__()
        self.backend = ops.check_backend(ops.default_backend() if backend is None else backend)
        self.input_dim, self.output_dim = input_dim, output_dim
        self.num_experts = num_experts
        self.w_importance, self.w_load = w_importance, w_load
        self.experts = FeedForwardExperts(num_experts, input_dim, hidden_dim, output_dim,
                                          num_hidden_layers, recompute_activations)
        # Sums per-expert totals over data-parallel workers before the CV² (§1.2), so the
        # balance loss sees the global batch. Identity in a single process; set by
        # fairseq_smoe.distributed when training is distributed. Must be differentiable.
        self.sum_over_workers: Callable[[torch.Tensor], torch.Tensor] = _this_worker_only
        # Wraps the backend that runs the experts: the identity in a single process; with
        # expert parallelism (fairseq_smoe.distributed) ``self.experts`` holds this worker's
        # share and the wrapper exchanges rows with the other workers around the backend.
        self.wrap_backend: Callable = _all_experts_here
        # Reused buffers of the loop backend between steps on CPU (gather, experts, combine:
        # ops/workspace.py); not state.
        self.workspace = Workspace()

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: one clear line instead of TorchScript's report on
        # the first construct it cannot compile, deep inside the gate or a backend.
        raise RuntimeError(f"{type(self).__name__} cannot be compiled by torch.jit.script (its "
                           f"routing uses Python-level autograd Functions and backends); run it "
                           f"eagerly, or use torch.compile (docs/layer.md)")

    def _flatten(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor]):
        if torch.jit.is_tracing():
            raise RuntimeError(f"{type(self).__name__} cannot be traced by torch.jit.trace (or "
                               f"exported through it): which experts run depends on the input "
                               f"values, which a trace would freeze. Run it eagerly, or use "
                               f"torch.compile (docs/layer.md)")
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"expected input of size [..., {self.input_dim}], got {list(x.shape)}")
        self._check_dtype(x)
        x_TD = x.reshape(-1, self.input_dim)
        if padding_mask is None:
            return x_TD, None
        if padding_mask.shape != x.shape[:-1]:
            raise ValueError(f"padding_mask must have shape {list(x.shape[:-1])} (x without its "
                             f"last dimension); got {list(padding_mask.shape)}")
        return x_TD, ~padding_mask.reshape(-1).to(torch.bool)

    def _check_dtype(self, x: torch.Tensor) -> None:
        """Inputs in the parameters' dtype (under autocast, any floating dtype: it casts)."""
        dtype = next(self.parameters()).dtype
        if not x.is_floating_point():
            raise TypeError(f"the MoE layer takes floating-point inputs; got {x.dtype} (embed "
                            f"token ids first, or convert with x.to({dtype}))")
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"input dtype {x.dtype} differs from the layer's parameters ({dtype}); "
                            f"convert the input (x.to({dtype})) or the layer (layer.to({x.dtype}))")

    def experts_backend(self, x: torch.Tensor):
        """The backend object this layer runs with for input ``x`` (``self.backend`` resolved for
        x's device and the experts' dtype; wrapped for expert parallelism)."""
        weights = list(self.experts.weights)
        dims = [weights[0].shape[1]] + [w.shape[2] for w in weights]
        backend = getattr(self, "backend", None) or ops.default_backend()  # older pickles
        # Under autocast the resident backends run the experts in autocast's dtype: choose for it.
        dtype = ops.compute_dtype(weights[0].dtype, x.device.type)
        wrap = getattr(self, "wrap_backend", _all_experts_here)  # older pickles
        return wrap(ops.get_backend(backend, x.device, dtype, dims))

    def _experts_and_combine(self, backend, x_TD, row_A, expert_A, gate_A):
        """Σ_i G(x)_i E_i(x) (eq. 1), y_TO: the backend groups the assignments by expert, runs
        each expert once on its rows and adds the gate-weighted outputs back."""
        return backend.experts_and_combine(self.experts, x_TD, row_A, expert_A, gate_A,
                                           self.num_experts, self.workspace)

    def _stats(self, importance, load, counts, aux_loss, num_tokens, unrouted) -> MoEStats:
        importance = self.sum_over_workers(importance)
        load = self.sum_over_workers(load)
        importance_loss, load_loss = balance_losses(importance, load, self.w_importance, self.w_load)
        return MoEStats(
            loss=importance_loss + load_loss + aux_loss,
            importance=importance.detach(),
            load=load.detach(),
            counts=self.sum_over_workers(counts.detach()),
            importance_loss=importance_loss.detach(),
            load_loss=load_loss.detach(),
            threshold_loss=aux_loss.detach(),
            num_tokens=_as_device_count(num_tokens, importance.device),
            unrouted=unrouted,
        )


class MoELayer(MoELayerBase):
    """Flat MoE layer: one gate over ``num_experts`` feed-forward experts.

    Args:
        input_dim, output_dim: sizes of x and y.
        num_experts: n.
        hidden_dim: width of each expert's hidden layer(s).
        k: experts per example (ignored by ``softmax``, which is dense; the App. F capacity
            factor m = k·|X|/n for ``batchwise``).
        gating: "noisy_top_k" (§2.1, default), "top_k" (no noise), "softmax" (dense),
            "batchwise" (App. F strictly balanced).
        num_hidden_layers: ReLU hidden layers per expert (MoE-1-Deep uses 4).
        noise_epsilon: added to softplus(x·W_noise) as in the reference code.
        w_importance, w_load: weights of the two balance losses (paper: 0.1 for LM, 0.01 for MT).
        recompute_activations: recompute expert hidden activations in backward (App. D).
        backend: "auto" | "loop" | "grouped_mm" | "triton" (see ``MoELayerBase``).
    """

    def __init__(self, input_dim: int, output_dim: int, num_experts: int, hidden_dim: int,
                 k: int = 4, gating: str = "noisy_top_k", num_hidden_layers: int = 1,
                 noise_epsilon: float = 1e-2, w_importance: float = 0.1, w_load: float = 0.1,
                 recompute_activations: bool = False, backend: Optional[str] = None):
        check_layer_args(gating, noise_epsilon, w_importance, w_load, input_dim=input_dim,
                         output_dim=output_dim, num_experts=num_experts, hidden_dim=hidden_dim,
                         num_hidden_layers=num_hidden_layers)
        check_k("k", k, num_experts, "num_experts")
        super().__init__(input_dim, output_dim, num_experts, hidden_dim, num_hidden_layers,
                         w_importance, w_load, recompute_activations, backend)
        self.k, self.gating = k, gating
        self.gate = build_gate(gating, input_dim, num_experts, k, noise_epsilon)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        x_TD, valid_T = self._flatten(x, padding_mask)
        backend = self.experts_backend(x_TD)
        # G(x): sparse (row, expert, gate) assignments
        decision = run_gate(self.gate, x_TD, valid_T, backend)
        y_TO = self._experts_and_combine(backend, x_TD, decision.row_A, decision.expert_A,
                                         decision.gate_A)
        unrouted = count_unrouted(decision.row_A, decision.expert_A, self.num_experts, valid_T,
                                  x_TD.shape[0])
        stats = self._stats(decision.importance_E, decision.load_E, decision.counts_E,
                            decision.aux_loss, decision.num_rows, unrouted)
        return y_TO.reshape(*x.shape[:-1], self.output_dim), stats

    def extra_repr(self) -> str:
        return f"gating={self.gating}, k={self.k}, backend={self.backend}"
