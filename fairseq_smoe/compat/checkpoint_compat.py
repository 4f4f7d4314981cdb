"""Make fairseq checkpoints load under torch >= 2.6 without any environment variable.

torch 2.6 changed ``torch.load`` to ``weights_only=True`` by default. fairseq checkpoints hold
their configuration as pickled argparse/omegaconf objects, so ``fairseq-generate``,
``fairseq-eval-lm``, ``fairseq-interactive`` and ``--restore-file`` fail on them with an
"Unsupported global" error. fairseq's own loader (``checkpoint_utils``) reads checkpoint files
that the user names on the command line, i.e. trusted files, exactly as fairseq always did.

We change only that module's view of ``torch``: its ``torch.load`` defaults to
``weights_only=False``; every other ``torch.load`` in the process keeps the safe default.
Only load checkpoints you trust (pickle can run code), as with any fairseq checkpoint.

The same goes for ``fairseq.distributed.utils``: on a data-parallel resume worker 0 reads the
checkpoint and sends its state to the other workers as a pickle (``_broadcast_object_slow``),
which they unpickle with ``torch.load``; under torch >= 2.6 that failed on the configuration's
omegaconf objects ("Weights only load failed ... DictConfig") on every worker but 0. The bytes
come from worker 0 of the same run.
"""

import functools
import types

import torch


class _TorchView(types.ModuleType):
    """Stands in for ``torch`` inside fairseq.checkpoint_utils; forwards everything."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)


class _TorchWithTrustedLoad(_TorchView):
    """The stand-in whose ``load`` defaults to ``weights_only=False``."""

    @staticmethod
    @functools.wraps(torch.load)
    def load(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return torch.load(*args, **kwargs)


def install() -> None:
    """Idempotent; called by ``compat.install_all`` (``--user-dir fairseq_smoe``)."""
    from fairseq import checkpoint_utils
    from fairseq.distributed import utils as distributed_utils

    for module in (checkpoint_utils, distributed_utils):
        if not isinstance(module.torch, _TorchWithTrustedLoad):
            module.torch = _TorchWithTrustedLoad()
