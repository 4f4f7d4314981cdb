"""fairseq models of fairseq-smoe.

fairseq's ``--user-dir fairseq_smoe`` imports this package. It installs the plugin's patches of
fairseq and registers the criteria, lr scheduler and optimizer (``compat.install_all``), then
registers the models and their ``--arch`` presets, module by module:

    lstm_moe_lm    model lstm_moe_lm and its presets (App. C: MoE-4 ... MoE-4096-h, baselines)
    lstm_moe_nmt   model lstm_moe_nmt and its presets (§5.3, App. E)

(``lm_costs`` and ``run_checks`` are helpers of these and register nothing.)
"""

from .. import compat

compat.install_all()

from . import lstm_moe_lm, lstm_moe_nmt  # noqa: E402, F401  (register the models)
