"""The translation models' learning-rate schedule (paper App. E):

    linear warmup for ``--warmup-updates`` steps (paper: 2000),
    constant for ``--hold-updates`` more (paper: 8000),
    then decay proportional to 1/sqrt(step):

    lr(s) = init + (peak − init) · s / W            s < W
    lr(s) = peak                                    W ≤ s < W + H
    lr(s) = peak · sqrt((W + H) / s)                s ≥ W + H

The decay is continuous where the hold ends. With ``--hold-updates 0`` this is fairseq's
``inverse_sqrt``. ``peak`` is ``--lr``.
"""

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import List

from fairseq.dataclass import FairseqDataclass
from fairseq.optim.lr_scheduler import FairseqLRScheduler, register_lr_scheduler
from omegaconf import II


@dataclass
class WarmupHoldInverseSqrtConfig(FairseqDataclass):
    warmup_updates: int = field(
        default=2000, metadata={"help": "warm the learning rate up linearly for the first N updates"}
    )
    hold_updates: int = field(
        default=8000, metadata={"help": "then keep it constant at --lr for N more updates"}
    )
    warmup_init_lr: float = field(
        default=-1,
        metadata={"help": "learning rate at update 0; default 0 (or --lr without warmup)"},
    )
    lr: List[float] = II("optimization.lr")


def warmup_hold_inverse_sqrt_lr(num_updates: int, peak_lr: float, warmup_updates: int,
                                hold_updates: int, warmup_init_lr: float = 0.0) -> float:
    """The learning rate after ``num_updates`` updates (formula in the module docstring)."""
    if num_updates < warmup_updates:
        return warmup_init_lr + (peak_lr - warmup_init_lr) * num_updates / warmup_updates
    decay_start = warmup_updates + hold_updates
    if num_updates < decay_start:
        return peak_lr
    return peak_lr * (max(decay_start, 1) / max(num_updates, 1)) ** 0.5


@register_lr_scheduler("warmup_hold_inverse_sqrt", dataclass=WarmupHoldInverseSqrtConfig)
class WarmupHoldInverseSqrtSchedule(FairseqLRScheduler):
    """Linear warmup, constant hold, then 1/sqrt(step) decay (paper App. E)."""

    def __init__(self, cfg: WarmupHoldInverseSqrtConfig, optimizer):
        super().__init__(cfg, optimizer)
        if isinstance(cfg.lr, Collection) and len(cfg.lr) > 1:
            raise ValueError("warmup_hold_inverse_sqrt takes a single --lr (the peak); got "
                             f"{list(cfg.lr)}. Use --lr-scheduler fixed for per-epoch rates.")
        for name in ("warmup_updates", "hold_updates"):
            if getattr(cfg, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0; got {getattr(cfg, name)}")
        self.peak_lr = cfg.lr[0] if isinstance(cfg.lr, Collection) else cfg.lr
        if cfg.warmup_init_lr < 0:
            cfg.warmup_init_lr = 0.0 if cfg.warmup_updates > 0 else self.peak_lr
        self.lr = self.lr_at(0)
        self.optimizer.set_lr(self.lr)

    def lr_at(self, num_updates: int) -> float:
        return warmup_hold_inverse_sqrt_lr(num_updates, self.peak_lr, self.cfg.warmup_updates,
                                           self.cfg.hold_updates, self.cfg.warmup_init_lr)

    def step(self, epoch, val_loss=None):
        """Epoch boundaries do not change the rate."""
        super().step(epoch, val_loss)
        return self.optimizer.get_lr()

    def step_update(self, num_updates):
        """Set the rate for the next update."""
        self.lr = self.lr_at(num_updates)
        self.optimizer.set_lr(self.lr)
        return self.lr
