"""Counting what a step costs a GPU, measurable on CPU: host reads, host copies and kernel launches.

    with count_step() as counts:
        y, stats = layer(x); (y.sum() + stats.loss).backward()
    counts.host_reads   # list of what read a device value back to the host
    counts.read_sites   # file:line of each of them (the innermost frame outside torch)
    counts.host_copies  # tensors made from Python data, with their file:line
    counts.aten_ops     # ATen operators dispatched (the launch proxy: about one kernel each)
    counts.launches     # Triton kernel launches (ops/triton_experts.py)

Host copies are the other way a step waits for a GPU: a tensor made from Python data
(``torch.tensor(list)``, ``torch.as_tensor(int, device=...)``, ``t[index] = True``) is built on
the host and copied to the device from pageable memory, which on CUDA blocks the host until the
device has caught up. They all reach the dispatcher as ``aten.lift_fresh`` (the one operator a
fresh tensor from Python data passes through), which is what is counted. A fill with a Python
scalar (``torch.full``, ``x + 1``) passes the value as a kernel argument and is no copy.

Host reads are the calls that would synchronise with a GPU: ``Tensor.tolist/item/__int__/
__float__/__bool__/__index__`` and the operators that read a value back to size their output
or to return it (``_local_scalar_dense``, ``nonzero``, ``bincount``, ``masked_select``,
``repeat_interleave`` without ``output_size``, ``unique``...). ATen operators are counted by a
``TorchDispatchMode``, forward and backward; views count too (they cost no kernel, but a per-
expert loop would show up through them as well). A read through a Tensor method counts once
(not again for the ``_local_scalar_dense`` it dispatches). While counting, the loop backend's
thread pool is off (threads.ENABLED), so its per-expert work runs, and is counted, in this thread.
"""

import contextlib
import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import threads

SYNCING_OPS = {"_local_scalar_dense", "nonzero", "bincount", "masked_select", "unique",
               "_unique", "_unique2", "unique_consecutive", "unique_dim", "nonzero_static_",
               "histogramdd", "_assert_async"}
_TENSOR_READS = ("tolist", "item", "__int__", "__float__", "__bool__", "__index__")
HOST_COPY_OPS = {"lift_fresh", "lift_fresh_copy"}
_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_FILE = os.path.abspath(__file__)


def _caller_site() -> str:
    """file:line of the innermost frame outside torch and this file: the code that asked."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path != _THIS_FILE and not path.startswith(_TORCH_DIR) and "<" not in frame.filename:
            return f"{_short(path)}:{frame.lineno}"
    return "?"


def _short(path: str) -> str:
    marker = os.sep + "fairseq_smoe" + os.sep
    return "fairseq_smoe" + os.sep + path.split(marker, 1)[1] if marker in path else path


@dataclass
class StepCounts:
    host_reads: List[str] = field(default_factory=list)
    read_sites: List[str] = field(default_factory=list)
    host_copies: List[str] = field(default_factory=list)
    aten_ops: int = 0
    launches: int = 0
    _reading: int = 0  # inside a Tensor-method read: its own dispatches are not a second read

    def read(self, what: str) -> None:
        self.host_reads.append(what)
        self.read_sites.append(f"{what} at {_caller_site()}")

    @property
    def syncs(self) -> List[str]:
        """Every read and copy that would make the host wait for a GPU, with its file:line."""
        return self.read_sites + self.host_copies

    @property
    def kernels(self) -> int:
        """ATen operators + Triton launches: the per-step launch proxy."""
        return self.aten_ops + self.launches


class _Counter(TorchDispatchMode):
    def __init__(self, counts: StepCounts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        self.counts.aten_ops += 1
        if name in SYNCING_OPS and not self.counts._reading:
            self.counts.read(f"aten.{name}")
        if name == "repeat_interleave" and (kwargs or {}).get("output_size") is None \
                and args and isinstance(args[0], torch.Tensor) and len(args) > 1 \
                and isinstance(args[1], torch.Tensor):
            self.counts.read("aten.repeat_interleave without output_size")
        if name in HOST_COPY_OPS:
            self.counts.host_copies.append(f"aten.{name} at {_caller_site()}")
        return func(*args, **(kwargs or {}))


def _launch_count() -> int:
    module = sys.modules.get("fairseq_smoe.ops.triton_experts")
    return module.LAUNCHES[0] if module is not None else 0


@contextlib.contextmanager
def count_step():
    """Count host reads, ATen operators and Triton launches inside the block (see above)."""
    counts = StepCounts()
    # Entering a dispatch mode makes torch import triton (for its own kernels). On a machine
    # without CUDA the triton backend needs triton imported in interpreter mode, which only its
    # own module sets up: load it first, so a step counted here can still run on that backend.
    if "triton" not in sys.modules and not torch.cuda.is_available():
        from . import triton_available

        if triton_available():
            from . import triton_experts  # noqa: F401
    originals = {name: getattr(torch.Tensor, name) for name in _TENSOR_READS}

    def reader(name, original):
        def read(self, *args, **kwargs):
            if not counts._reading:
                counts.read(f"Tensor.{name}")
            counts._reading += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                counts._reading -= 1
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, reader(name, original))
    launches = _launch_count()
    threads_enabled, threads.ENABLED = threads.ENABLED, False
    try:
        with _Counter(counts):
            yield counts
    finally:
        threads.ENABLED = threads_enabled
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        counts.launches = _launch_count() - launches
