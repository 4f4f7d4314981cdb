"""Reusable buffers for the MoE layer's large per-step tensors on CPU (the speed of paper §3 on CPU).

A training step of an MoE layer makes a handful of tensors of tokens·k rows (the dispatched
inputs, the expert hidden activations and outputs, their gradients) and one gradient as large as
all expert weights together (1 GB for MoE-256 in fp32). On CPU every fresh allocation of that
size is a new mapping whose pages the kernel faults in and zeroes on first touch, which costs
several times more than the arithmetic that fills it (measured: a 64 MiB gather takes ~4× longer
into a fresh tensor than into a reused one; see docs/performance.md). GPUs have PyTorch's
caching allocator for this; CPUs do not.

``Workspace.empty(name, shape, dtype, device)`` returns a tensor over a storage kept from the
previous step when nothing else still holds that storage, and a fresh one otherwise. "Holds" is
the storage's reference count: a buffer that is still saved for a backward pass, still the
``.grad`` of a parameter (gradient accumulation), or still referenced by any tensor of the caller
is never handed out again, so reuse is invisible to the caller. Tensors handed out are
uninitialised, like ``torch.empty``. On CUDA (which has its caching allocator), for small
tensors, when disabled, or on a torch without the reference-count query, it is ``torch.empty``.

Disable with ``SMOE_REUSE_BUFFERS=0`` in the environment or ``Workspace.enabled = False``.
A workspace is not copied: ``copy.deepcopy`` and pickling give an empty one.

Threads: one layer may be called from several Python threads at once (a server, a data-parallel
wrapper). The check that nobody holds a buffer and the taking of it are one step under a lock,
so two threads can never both see a buffer free and both write into it.
"""

import os
import threading
from typing import Dict, Sequence

import torch

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)

# Below this size the C allocator already recycles memory without new page faults.
MIN_BYTES = 1 << 20
# Held from the use-count check until the tensor over the storage exists (which raises the
# count): one lock for every workspace, so nothing of it needs pickling.
_TAKE_LOCK = threading.Lock()


class Workspace:
    enabled = os.environ.get("SMOE_REUSE_BUFFERS", "1") not in ("0", "false", "no")

    def __init__(self):
        self._storages: Dict[str, torch.UntypedStorage] = {}

    def empty(self, name: str, shape: Sequence[int], dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
        shape = tuple(int(s) for s in shape)
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * dtype.itemsize
        if (not self.enabled or _storage_use_count is None or torch.device(device).type != "cpu"
                or nbytes < MIN_BYTES):
            return torch.empty(shape, dtype=dtype, device=device)
        with _TAKE_LOCK:
            storage = self._storages.get(name)
            if storage is None or storage.nbytes() < nbytes or _storage_use_count(storage._cdata) > 1:
                # Missing, too small, or still in use elsewhere: a new one (the old one lives on
                # for as long as its other holders keep it).
                storage = torch.UntypedStorage(nbytes, device=device)
                self._storages[name] = storage
            # A new tensor object over the storage (not a view): nothing here keeps it alive.
            return torch.empty(0, dtype=dtype, device=device).set_(storage, 0, shape)

    def nbytes(self) -> int:
        """Bytes held between steps."""
        return sum(s.nbytes() for s in self._storages.values())

    def clear(self):
        self._storages.clear()

    def __deepcopy__(self, memo):
        return Workspace()

    def __getstate__(self):
        return {"_storages": {}}

    def __repr__(self) -> str:
        return f"Workspace({len(self._storages)} buffers, {self.nbytes() / 2**20:.1f} MiB)"
