"""Optimizers the plugin registers with fairseq: ``--optimizer smoe_adam`` (App. D)."""

from .smoe_adam import SmoeAdam, SmoeAdamW, is_expert_param

# smoe_adam.install_fp16_hook (a patch of fairseq's FP16Optimizer) is installed by
# fairseq_smoe.compat.install_all (SMOE_PATCH_FP16_EXPERTS=0 switches it off); this package
# registers smoe_adam when fairseq_smoe.models imports it.

__all__ = ["SmoeAdam", "SmoeAdamW", "is_expert_param"]
