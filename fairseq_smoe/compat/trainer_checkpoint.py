"""``Trainer.save_checkpoint`` and ``Trainer.load_checkpoint``, wrapped once, with the patches'
hooks in one ordered table.

Three patches act around the trainer's checkpoint calls. Each used to wrap the methods itself,
so how they stacked was recorded only by the order of ``compat.PATCHES``. Here the methods are
wrapped once; a patch registers named hooks, and ``ORDER`` says in which order they run:

    load, before   may change the file name (EXPERT_PARALLEL: every worker reads its own share)
    load, after    sees the extra state fairseq returns (PATIENCE_RESUME: the --patience count;
                   CHECKPOINT_SAFETY: which file was read, for the data position)
    save, before   may add to the extra state (PATIENCE_RESUME)

Hooks of patches switched off are never registered. Installed by the patches that need it.
"""

from typing import Callable, Dict, Optional

ORDER = ("EXPERT_PARALLEL", "PATIENCE_RESUME", "CHECKPOINT_SAFETY")

_load_before: Dict[str, Callable] = {}  # name -> (trainer, filename) -> filename
_load_after: Dict[str, Callable] = {}  # name -> (trainer, filename, extra_state, options) -> None
_save_before: Dict[str, Callable] = {}  # name -> (trainer, extra_state) -> extra_state


def _ordered(hooks: Dict[str, Callable]):
    return [hooks[name] for name in ORDER if name in hooks]


def add_hooks(name: str, load_before: Optional[Callable] = None,
              load_after: Optional[Callable] = None, save_before: Optional[Callable] = None) -> None:
    """Register ``name``'s hooks (``name`` must be in ``ORDER``) and wrap the trainer once."""
    if name not in ORDER:
        raise ValueError(f"{name} has no place in trainer_checkpoint.ORDER")
    for table, hook in ((_load_before, load_before), (_load_after, load_after),
                        (_save_before, save_before)):
        if hook is not None:
            table[name] = hook
    _install()


def _install() -> None:
    from fairseq.trainer import Trainer

    if getattr(Trainer, "_smoe_checkpoint_hooks", False):
        return
    Trainer._smoe_checkpoint_hooks = True
    save_checkpoint, load_checkpoint = Trainer.save_checkpoint, Trainer.load_checkpoint

    def trainer_save_checkpoint(self, filename, extra_state):
        for hook in _ordered(_save_before):
            extra_state = hook(self, extra_state)
        return save_checkpoint(self, filename, extra_state)

    def trainer_load_checkpoint(self, filename, reset_optimizer=False, reset_lr_scheduler=False,
                                optimizer_overrides=None, reset_meters=False):
        for hook in _ordered(_load_before):
            filename = hook(self, filename)
        extra_state = load_checkpoint(self, filename, reset_optimizer, reset_lr_scheduler,
                                      optimizer_overrides, reset_meters=reset_meters)
        options = {"reset_optimizer": reset_optimizer, "reset_meters": reset_meters}
        for hook in _ordered(_load_after):
            hook(self, filename, extra_state, options)
        return extra_state

    Trainer.save_checkpoint = trainer_save_checkpoint
    Trainer.load_checkpoint = trainer_load_checkpoint
