"""Expert backends: how the experts' grouped products and the token routing around them run.

The MoE math (gates, balance losses, the layers) lives in ``fairseq_smoe.modules``; this package
holds the machinery that makes it fast on a given device, behind one small interface. A layer
picks a backend by name (``MoELayer(..., backend="auto")``, default ``SMOE_EXPERTS_BACKEND``,
``--moe-experts-backend`` in the fairseq models):

    loop        the CPU path: routing counts on the host, one matrix product per expert spread
                over the intra-op threads, reused buffers (loop.py, threads.py, workspace.py)
    grouped_mm  ``torch._grouped_mm``, one grouped product per expert layer, never more than
                1024 groups per call (grouped_mm.py)
    triton      our Triton kernels for the grouped products, forward, input and weight gradient,
                fp32/fp16/bf16, any CUDA arch Triton supports; on CPU they run under the Triton
                interpreter (triton_experts.py)
    auto        ``loop`` on CPU; on CUDA ``grouped_mm`` for bf16 weights on compute capability
                9.x, else ``triton`` (``loop`` when triton is not installed)

``grouped_mm`` and ``triton`` share the device-resident routing of resident.py: counts, offsets
and the token permutation stay on the device, every shape is fixed by the input (top-k gating
always makes T·k assignments; padding goes to a dropped tail), so a training step reads nothing
back to the host and issues the same number of kernels whatever the number of experts, groups
or tokens. The backend, not the device type, selects the code path: every backend runs on CPU.

Interface (``get_backend(name, device, dtype, dims)`` returns one of these objects). ``experts``
is the layer's parameter holder (``modules.experts.FeedForwardExperts``): a backend reads its
stacked ``weights`` [E, I, O], ``biases`` [E, O] and ``recompute_activations`` and runs them
itself; nothing here calls back into a module.

    backend.name, backend.resident
    backend.group(key_A, num_groups) -> Grouping          sort assignments by group
    backend.gather(x_TD, row_S, workspace, name) -> x_SD   rows of x in that order
    backend.grouped_matmul(x_SD, grouping, weight_GIO)     one weight per group, no bias
    backend.feed_forward(experts, x_SD, counts, workspace) -> y_SO
        every expert on its block of rows (rows sorted by expert, ``counts`` host ints)
    backend.combine(y_SO, row_S, gate_S, num_rows, workspace) -> y_TO
        gate-weighted rows added into their row: the Σ of eq. (1)
    backend.experts_and_combine(experts, x_TD, row_A, expert_A, gate_A, num_experts, workspace)
        -> y_TO: group, gather, experts and combine: Σ_i G(x)_i E_i(x) (eq. 1)

Expert parallelism (``fairseq_smoe.distributed.ExpertParallel``) wraps a backend with the same
interface: it groups and gathers with the local backend, exchanges rows between workers, runs
the local experts with ``feed_forward`` and adds the returned rows up with ``combine``.
The fused noisy top-k pass of the gates (noisy_topk.py) also runs the backend's way.
"""

import importlib.util
import os
from typing import Sequence

import torch

BACKENDS = ("auto", "loop", "grouped_mm", "triton")


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


def default_backend() -> str:
    """``SMOE_EXPERTS_BACKEND`` from the environment (default ``auto``)."""
    value = os.environ.get("SMOE_EXPERTS_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"SMOE_EXPERTS_BACKEND must be one of {', '.join(BACKENDS)}; got "
                         f"{os.environ['SMOE_EXPERTS_BACKEND']!r}")
    return value


def compute_dtype(param_dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype the resident backends run the experts' products in: the parameters', or under
    autocast (``--amp``) autocast's half type for fp32 master weights, as autocast runs a
    ``Linear``. (The loop keeps the parameters' dtype: on CPU, fp32 products are the fast ones.)"""
    if param_dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return param_dtype


def triton_available() -> bool:
    """Whether triton is installed, found without importing it (an import before the triton
    backend's own would fix Triton's interpreter mode for the process: triton_experts.py)."""
    return importlib.util.find_spec("triton") is not None


def resolve(name: str, device, dtype: torch.dtype, dims: Sequence[int] = ()) -> str:
    """The concrete backend ``name`` means for weights of ``dtype`` on ``device``."""
    check_backend(name)
    if name != "auto":
        return name
    device = torch.device(device)
    if device.type != "cuda":
        return "loop"
    from . import grouped_mm

    if dtype == torch.bfloat16 and grouped_mm.fast_on(device, dtype, dims):
        return "grouped_mm"
    return "triton" if triton_available() else "loop"


_BACKENDS = {}


def get_backend(name: str, device, dtype: torch.dtype, dims: Sequence[int] = ()):
    """The backend object for ``name`` (resolving ``auto``); checks what it needs (triton
    installed, ``torch._grouped_mm`` present, aligned sizes) with a clear error."""
    concrete = resolve(name, device, dtype, dims)
    if concrete == "grouped_mm":
        from . import grouped_mm

        grouped_mm.check_usable(dtype, dims)
    if concrete not in _BACKENDS:
        if concrete == "loop":
            from .loop import LoopBackend as cls
        elif concrete == "grouped_mm":
            from .grouped_mm import GroupedMMBackend as cls
        else:
            from .triton_experts import TritonBackend as cls
        _BACKENDS[concrete] = cls()
    return _BACKENDS[concrete]
