"""``--patience`` survives a resume (``SMOE_PATCH_PATIENCE_RESUME``). Installed by
``compat.install_all``.

fairseq 0.12 counts the epochs without a better validation score in attributes of
``fairseq_cli.train.should_stop_early`` (``best``, ``num_runs``) and keeps them in no checkpoint.
A run resumed from ``checkpoint_last.pt`` therefore starts the count again from the first
validation after the resume, taken as the best so far even when it is worse than the run's real
best: an interrupted run trains up to --patience epochs longer than the same run uninterrupted,
and a run interrupted every few epochs never stops early at all.

The patch writes the two values into every checkpoint's ``extra_state`` and, when a checkpoint
is loaded with the optimizer and meters kept (fairseq's own condition for restoring the best
score) and the same --best-checkpoint-metric and direction, puts them back. A checkpoint from
before the patch, or one whose metric differs, leaves fairseq's behaviour as it was (logged).
"""

import logging

logger = logging.getLogger(__name__)

STATE_KEY = "smoe_patience"


def _counter():
    """fairseq_cli.train.should_stop_early, whose attributes hold the count."""
    from fairseq_cli import train

    return train.should_stop_early


def patience_state(checkpoint_cfg):
    """What to save: the count's best and epochs without improvement, and the metric they are in;
    None before the first validation."""
    counter = _counter()
    if getattr(counter, "best", None) is None:
        return None
    return {"best": counter.best, "num_runs": getattr(counter, "num_runs", 0),
            "metric": checkpoint_cfg.best_checkpoint_metric,
            "maximize": bool(checkpoint_cfg.maximize_best_checkpoint_metric)}


def restore_patience(state, checkpoint_cfg, reset_optimizer, reset_meters) -> bool:
    """Put a saved count back; False (and fairseq counts afresh) where it does not apply."""
    if state is None or reset_optimizer or reset_meters:
        return False
    if (state["metric"], state["maximize"]) != (checkpoint_cfg.best_checkpoint_metric,
                                                bool(checkpoint_cfg.maximize_best_checkpoint_metric)):
        logger.info(f"--patience counts afresh: the checkpoint counted on {state['metric']!r}, "
                    f"this run on {checkpoint_cfg.best_checkpoint_metric!r}")
        return False
    counter = _counter()
    counter.best, counter.num_runs = state["best"], state["num_runs"]
    logger.info(f"--patience resumes: best {state['metric']} {state['best']}, "
                f"{state['num_runs']} epoch(s) without improvement")
    return True


def install() -> None:
    """Hooks on the trainer's save and load (compat.trainer_checkpoint). Idempotent."""
    from .trainer_checkpoint import add_hooks

    def save_before(trainer, extra_state):
        state = patience_state(trainer.cfg.checkpoint)
        return extra_state if state is None else dict(extra_state, **{STATE_KEY: state})

    def load_after(trainer, filename, extra_state, options):
        if extra_state is not None:
            restore_patience(extra_state.get(STATE_KEY), trainer.cfg.checkpoint,
                             options["reset_optimizer"], options["reset_meters"])

    add_hooks("PATIENCE_RESUME", load_after=load_after, save_before=save_before)
