"""Make fairseq checkpoints load under torch >= 2.6 without any environment variable.

torch 2.6 changed ``torch.load`` to ``weights_only=True`` by default. fairseq checkpoints hold
their configuration as pickled argparse/omegaconf objects, so ``fairseq-generate``,
``fairseq-eval-lm``, ``fairseq-interactive`` and ``--restore-file`` fail on them with an
"Unsupported global" error. fairseq's own loader (``checkpoint_utils``) reads checkpoint files
that the user names on the command line, i.e. trusted files, exactly as fairseq always did.

We change only that module's view of ``torch``: its ``torch.load`` defaults to
``weights_only=False``; every other ``torch.load`` in the process keeps the safe default.
Only load checkpoints you trust (pickle can run code), as with any fairseq checkpoint.
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

    if not isinstance(checkpoint_utils.torch, _TorchWithTrustedLoad):
        checkpoint_utils.torch = _TorchWithTrustedLoad()
