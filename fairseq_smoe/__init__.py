"""fairseq-smoe: the Sparsely-Gated Mixture-of-Experts layer (Shazeer et al. 2017) for fairseq.

``fairseq_smoe.modules`` is pure PyTorch. Importing the package as a fairseq plugin
(``--user-dir fairseq_smoe``) also registers the models, tasks and criteria and makes
fairseq checkpoints load under torch >= 2.6.
"""

__version__ = "0.1.0"

try:
    import fairseq  # noqa: F401
except ImportError:  # the modules work without fairseq
    pass
else:
    from . import checkpoint_compat

    checkpoint_compat.install()
    from . import numpy_compat

    numpy_compat.install()  # fairseq's np.compat.long under NumPy 2
    from . import distributed

    distributed.install()  # expert-parallel checkpoints and gradient clipping in fairseq's trainer
    from . import criterions  # noqa: F401  (fairseq's --user-dir imports only models/ and tasks/)
    from . import lr_scheduler  # noqa: F401
    from . import models  # noqa: F401
