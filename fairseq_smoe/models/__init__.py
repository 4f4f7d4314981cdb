"""The plugin as fairseq's ``--user-dir fairseq_smoe`` loads it: importing this package installs
the patches of fairseq (``compat.install_all``) and registers, in this order:

    criteria        smoe_cross_entropy, smoe_label_smoothed_cross_entropy
                    (criterions/smoe_cross_entropy.py)
    lr scheduler    warmup_hold_inverse_sqrt (lr_scheduler/warmup_hold_inverse_sqrt.py)
    optimizers      smoe_adam, smoe_adamw (optim/smoe_adam.py)
    models          lstm_moe_lm and its --arch presets (lstm_moe_lm.py);
                    lstm_moe_nmt and its --arch presets (lstm_moe_nmt.py)

(``lm_costs``, ``parallel`` and ``run_checks`` here are helpers of the models and register
nothing.) A program driving fairseq in-process calls ``fairseq_smoe.plugin.install()``.
"""

from .. import compat

compat.install_all()

from ..criterions import smoe_cross_entropy  # noqa: E402, F401
from ..lr_scheduler import warmup_hold_inverse_sqrt  # noqa: E402, F401
from ..optim import smoe_adam  # noqa: E402, F401
from . import lstm_moe_lm, lstm_moe_nmt  # noqa: E402, F401
