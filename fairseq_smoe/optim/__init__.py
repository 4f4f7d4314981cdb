"""Optimizers the plugin registers with fairseq: ``--optimizer smoe_adam`` (App. D)."""

from .smoe_adam import SmoeAdam, SmoeAdamW, install_fp16_hook, is_expert_param

install_fp16_hook()

__all__ = ["SmoeAdam", "SmoeAdamW", "is_expert_param"]
