"""fairseq-smoe: the Sparsely-Gated Mixture-of-Experts layer (Shazeer et al. 2017) for fairseq.

``fairseq_smoe.modules`` is pure PyTorch. Importing the package as a fairseq plugin
(``--user-dir fairseq_smoe``) also registers the models, criteria and lr scheduler, and mends
what the installed fairseq 0.12 needs on today's stack:
  * checkpoint_compat: fairseq checkpoints load under torch >= 2.6 (weights_only default);
  * checkpoint_safety: checkpoint files appear atomically (temp + fsync + rename) and carry a
    checksum of the model verified on load; a missing --restore-file/--path stops with one line;
  * numpy_compat: fairseq's datasets run under NumPy 2 (np.compat.long);
  * batching_compat: the last batch of a dataset is no longer silently dropped;
  * distributed: expert-parallel checkpoints and gradient clipping in fairseq's trainer;
  * cli_errors: our configuration errors end fairseq commands with one line naming the fix.
"""

__version__ = "0.1.0"

try:
    import fairseq  # noqa: F401
except ImportError:  # the modules work without fairseq
    pass
else:
    from . import (batching_compat, checkpoint_compat, checkpoint_safety, cli_errors, distributed,
                   numpy_compat)

    checkpoint_compat.install()
    checkpoint_safety.install()  # after checkpoint_compat (wraps its torch.load)
    numpy_compat.install()
    batching_compat.install()
    distributed.install()
    cli_errors.install()
    # fairseq's --user-dir imports only models/ and tasks/: register the rest here.
    from . import criterions, lr_scheduler, models, optim  # noqa: F401
