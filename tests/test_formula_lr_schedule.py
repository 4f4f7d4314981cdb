"""warmup_hold_inverse_sqrt: the translation schedule of the paper (App. E)."""

import math

import pytest
import torch
from fairseq.optim import FairseqOptimizer
from fairseq.optim.lr_scheduler import LR_SCHEDULER_REGISTRY, build_lr_scheduler
from omegaconf import OmegaConf

from fairseq_smoe.lr_scheduler.warmup_hold_inverse_sqrt import (
    WarmupHoldInverseSqrtConfig,
    warmup_hold_inverse_sqrt_lr,
)
from fairseq_smoe.plugin import install

install()  # the plugin, as --user-dir does: registers it with fairseq, installs its patches


class _SGD(FairseqOptimizer):
    def __init__(self):
        super().__init__(None)
        self._optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def make_scheduler(**fields):
    cfg = OmegaConf.structured(WarmupHoldInverseSqrtConfig(**fields))
    cfg._name = "warmup_hold_inverse_sqrt"
    optimizer = _SGD()
    return build_lr_scheduler(cfg, optimizer), optimizer


def test_registered_under_its_own_name():
    assert "warmup_hold_inverse_sqrt" in LR_SCHEDULER_REGISTRY
    assert "inverse_sqrt" in LR_SCHEDULER_REGISTRY  # fairseq's own one is still there


def test_paper_schedule_values():
    lr = lambda step: warmup_hold_inverse_sqrt_lr(step, 1e-3, 2000, 8000)  # noqa: E731
    assert lr(0) == 0.0
    assert lr(1000) == pytest.approx(0.5e-3)
    assert lr(1999) == pytest.approx(1e-3 * 1999 / 2000)
    assert lr(2000) == lr(5000) == lr(9999) == 1e-3  # the hold
    assert lr(10000) == pytest.approx(1e-3)  # continuous where the decay starts
    assert lr(40000) == pytest.approx(0.5e-3)  # 1/sqrt(step)
    assert lr(90000) == pytest.approx(1e-3 / 3)
    assert all(lr(s + 1) < lr(s) for s in range(10000, 10100))


def test_scheduler_drives_the_optimizer():
    scheduler, optimizer = make_scheduler(warmup_updates=4, hold_updates=6, lr=[0.1])
    assert optimizer.get_lr() == 0.0  # set at construction
    seen = [scheduler.step_update(step) for step in range(0, 41)]
    assert seen[2] == pytest.approx(0.05)
    assert seen[4:10] == [0.1] * 6
    assert seen[40] == pytest.approx(0.1 * math.sqrt(10 / 40))
    assert optimizer.get_lr() == pytest.approx(seen[40])
    assert scheduler.step(epoch=1) == pytest.approx(seen[40])  # epochs do not move it


def test_no_warmup_no_hold_is_plain_inverse_sqrt():
    scheduler, optimizer = make_scheduler(warmup_updates=0, hold_updates=0, lr=[0.2])
    assert optimizer.get_lr() == 0.2
    assert scheduler.step_update(4) == pytest.approx(0.1)


def test_warmup_init_lr_and_errors():
    scheduler, optimizer = make_scheduler(warmup_updates=10, hold_updates=0, lr=[1.0],
                                          warmup_init_lr=0.5)
    assert optimizer.get_lr() == 0.5
    assert scheduler.step_update(5) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="single --lr"):
        make_scheduler(lr=[0.1, 0.2])
    with pytest.raises(ValueError, match="--hold-updates"):
        make_scheduler(hold_updates=-1, lr=[0.1])
