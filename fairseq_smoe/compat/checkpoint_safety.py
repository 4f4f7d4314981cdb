"""Checkpoint files that survive a kill, show damage, and are never lost to a typo.

Installed by ``compat.install_all`` (``--user-dir fairseq_smoe``); ``SMOE_PATCH_CHECKPOINT_SAFETY=0``
(or ``SMOE_CHECKPOINT_SAFETY=0``) leaves fairseq's checkpoint code as it is. What changes in
fairseq 0.12's ``checkpoint_utils``:

* ``torch_persistent_save`` (the trainer writes the first file of a save with it): the file is
  written as ``NAME.tmp-PID``, fsynced, renamed to ``NAME`` and the directory fsynced. fairseq
  renamed too, but without fsync, so a power loss could leave an empty file.
* ``PathManager.copy`` as ``save_checkpoint`` uses it (the copies of that file to
  ``checkpoint_last.pt``, ``checkpoint_best.pt``, ...): the same temp name + fsync + rename.
  fairseq copied onto the target in place; a kill during the copy left a truncated
  ``checkpoint_last.pt`` and the plain resume crashed. With expert parallelism every worker's
  ``-expert-shard{r}`` files go the same way. A kill at any moment leaves the old or the new
  file (and at worst a stale ``NAME.tmp-PID``, removed by the next save of that name).
  The fsync (durability against a power loss, not needed against a kill) costs about 1/3 of
  the write of a 4 GB file here; ``SMOE_CHECKPOINT_FSYNC=0`` skips it.
* Checksums: every saved checkpoint carries ``state["moe_checksum"]``, a CRC32 of the bytes of
  each tensor of the model, the criterion and the optimizer state (``checked_tensors``). It is
  verified where ``checkpoint_utils`` reads a file (its ``torch.load``: every fairseq command,
  every shard file), before fairseq upgrades or overrides anything, and then removed from the
  state. A mismatch, or a file that cannot be read at all (truncated), ends the command with one
  line naming the file and the fix (a ValueError that ``cli_errors`` prints). Files without a
  checksum (older checkpoints, other tools) load as before, with one INFO line.
  ``SMOE_CHECKPOINT_CHECKSUM=0`` neither computes nor verifies. Cost: CRC32 runs at 1.4-4 GB/s
  per core (tensors in parallel threads), i.e. 1-3 s per 1B fp32 parameters (4 GB), measured
  beside 24 s for ``torch.save`` and 18 s for ``torch.load`` of those 4 GB on the same machine:
  about a tenth of the write or read (Adam's moments triple both alike).
* ``load_checkpoint`` (fairseq-train's resume): an explicit ``--restore-file`` that does not
  exist stops the run before anything is loaded or written (fairseq started from scratch and
  then overwrote ``checkpoint_last.pt``). The default, ``checkpoint_last.pt`` in ``--save-dir``,
  still starts fresh when absent. A missing ``--finetune-from-model`` gets the same one line.
  An optimizer state saved for other parameters (an older hierarchical checkpoint: one
  parameter per secondary gate) ends with one line naming ``--reset-optimizer``, not torch's
  ValueError.
* ``load_model_ensemble_and_task`` (``--path`` of fairseq-eval-lm/-generate/-validate/
  -interactive): a missing file ends with one line instead of fairseq's IOError traceback.
"""

import argparse
import functools
import logging
import os
from typing import Callable, Optional

import torch

from ..checkpoint_files import (
    _enabled,
    add_checksum,
    atomic_copy,
    atomic_write,
    base_path,
    check_save_dir,
    check_writable_dir,
    file_name,
    numbered_checkpoints,
    peek,
    use_another,
    verify_and_strip,
)

logger = logging.getLogger(__name__)

DEFAULT_RESTORE_FILE = "checkpoint_last.pt"
_NOT_DAMAGE = (ImportError, AttributeError, MemoryError)  # environment problems, not the file's


# ---------------------------------------------------------------------------------------------
# The MoE options a checkpoint was trained with

MOE_OPTIONS_KEY = "smoe_moe_options"
_OUR_MODELS = ("lstm_moe_lm", "lstm_moe_nmt")


def _model_cfg(state: dict):
    """The model's options in a checkpoint (a dict or DictConfig; a Namespace in old files)."""
    cfg = state.get("cfg")
    if cfg is not None:
        return _get(cfg, "model")
    return state.get("args")


def _get(config, key):
    """``config[key]`` of a dict or DictConfig, ``config.key`` of a Namespace; None if absent."""
    return config.get(key) if hasattr(config, "get") else getattr(config, key, None)


def _options(model_cfg) -> dict:
    items = model_cfg.items() if hasattr(model_cfg, "items") else vars(model_cfg).items()
    return {key: value for key, value in items if str(key).startswith("moe_")}


def record_moe_options(state) -> None:
    """Save the ``moe_*`` options beside the configuration: the weights cannot tell k, the
    gating or the balance weights, so a configuration that loses one can be mended on load."""
    model_cfg = _model_cfg(state) if isinstance(state, dict) else None
    if model_cfg is not None:
        options = _options(model_cfg)
        if options:
            state[MOE_OPTIONS_KEY] = options


def _architecture_defaults(model_cfg) -> dict:
    arch = _get(model_cfg, "arch")
    try:
        from fairseq.models import ARCH_CONFIG_REGISTRY

        defaults = argparse.Namespace()
        ARCH_CONFIG_REGISTRY[arch](defaults)
        return _options(defaults)
    except Exception:  # an unknown architecture: nothing to say about its defaults
        return {}


def restore_moe_options(state: dict, path: str) -> None:
    """A checkpoint of our models whose configuration lacks ``moe_*`` options: put back the
    recorded values; without a record, say which defaults the model will be built with."""
    model_cfg = _model_cfg(state)
    if model_cfg is None:
        return
    name = _get(model_cfg, "_name") or _get(model_cfg, "arch")
    present = _options(model_cfg)
    if not present and not str(name or "").startswith(_OUR_MODELS):
        return
    defaults = _architecture_defaults(model_cfg)
    missing = sorted(set(defaults) - set(present)) if defaults else []
    record = state.get(MOE_OPTIONS_KEY) or {}
    restored = {key: record[key] for key in missing if key in record}
    if restored:
        from omegaconf import OmegaConf, open_dict

        if OmegaConf.is_config(model_cfg):
            with open_dict(model_cfg):
                for key, value in restored.items():
                    model_cfg[key] = value
        elif hasattr(model_cfg, "__setitem__"):
            model_cfg.update(restored)
        else:
            for key, value in restored.items():
                setattr(model_cfg, key, value)
        logger.warning(f"{path}: the configuration lacks {', '.join(restored)}; restored from the "
                       f"options recorded in the checkpoint "
                       f"({', '.join(f'{k}={v!r}' for k, v in restored.items())})")
    assumed = [key for key in missing if key not in restored]
    if assumed:
        logger.warning(f"{path}: the configuration lacks {', '.join(assumed)} and the checkpoint "
                       f"records no value: the model is built with the architecture's default "
                       f"({', '.join(f'{k}={defaults[k]!r}' for k in assumed)}). If it was trained "
                       f"otherwise, pass the trained values with --model-overrides, e.g. "
                       f"--model-overrides \"{{'{assumed[0]}': ...}}\"")


# What --model-overrides may change: options of how the layer runs, not of its parameters.
OVERRIDABLE_MOE_OPTIONS = ("moe_k", "moe_noise_epsilon", "moe_w_importance", "moe_w_load",
                           "moe_experts_backend", "moe_recompute", "moe_expert_parallel")


def check_model_overrides(arg_overrides, filenames) -> None:
    """Refuse ``--model-overrides`` of ``moe_*`` options that shape the parameters (experts,
    groups, hidden sizes, the gating's own weights): the checkpoint's weights would not load
    (a load_state_dict traceback). The same value as trained is no change and passes."""
    changing = sorted(key for key in (arg_overrides or {}) if str(key).startswith("moe_")
                      and key not in OVERRIDABLE_MOE_OPTIONS)
    if not changing:
        return
    trained = {}
    for path in filenames:
        state = peek(path) or {}
        model_cfg = _model_cfg(state)
        if model_cfg is not None:
            trained = _options(model_cfg)
            break
    changed = [key for key in changing if key not in trained or trained[key] != arg_overrides[key]]
    if changed:
        said = ", ".join(f"{key} {trained.get(key, '?')!r} -> {arg_overrides[key]!r}" for key in changed)
        raise ValueError(f"--model-overrides cannot change {', '.join(changed)} ({said}): it shapes the "
                         f"model's parameters, which the checkpoint holds as trained. Options that "
                         f"can be overridden at inference: {', '.join(OVERRIDABLE_MOE_OPTIONS)}")


def _verified_load(load):
    """checkpoint_utils' ``torch.load``: one clear error for an unreadable file; checksum check."""
    @functools.wraps(load)
    def verified_load(f, *args, **kwargs):
        path = file_name(f)
        try:
            state = load(f, *args, **kwargs)
        except _NOT_DAMAGE:
            raise
        except Exception as error:
            detail = (str(error).strip().splitlines() or [""])[0]
            detail = detail.split(". ")[0][:160]
            raise ValueError(
                f"cannot read checkpoint {path}: the file is truncated or damaged "
                f"({type(error).__name__}{': ' + detail if detail else ''}). "
                f"{use_another(path)}") from None
        verify_and_strip(state, path)
        if isinstance(state, dict):
            restore_moe_options(state, path)
        return state

    verified_load._smoe_verified = True
    return verified_load


# ---------------------------------------------------------------------------------------------
# Files named on the command line


def _checkpoints_listing(directory: str) -> str:
    names = [os.path.basename(p) for p in numbered_checkpoints(directory)[:3]]
    names = [n for n in ("checkpoint_last.pt", "checkpoint_best.pt")
             if os.path.isfile(os.path.join(directory, n))] + names
    return ", ".join(names) if names else ""


def check_restore_file(cfg, suffix: Optional[str], exists: Callable[[str], bool]) -> None:
    """Stop before anything is loaded or written when an explicit ``--restore-file`` (or
    ``--finetune-from-model``) names no file. ``suffix``: the trainer's checkpoint suffix."""
    restore, save_dir = cfg.restore_file, cfg.save_dir
    default_last = os.path.join(save_dir, f"checkpoint_last{suffix or ''}.pt")
    if restore == DEFAULT_RESTORE_FILE:
        finetune = getattr(cfg, "finetune_from_model", None)
        if (finetune and not exists(default_last) and getattr(cfg, "continue_once", None) is None
                and not exists(finetune)):
            raise ValueError(f"--finetune-from-model {finetune}: no such file "
                             f"({os.path.abspath(finetune)}); give the path of the pretrained "
                             f"checkpoint")
        return
    read = base_path(restore.replace(".pt", suffix + ".pt") if suffix is not None else restore)
    if exists(read):
        return
    if os.path.realpath(base_path(read)) == os.path.realpath(base_path(default_last)):
        return  # --restore-file SAVE_DIR/checkpoint_last.pt: the default, a fresh start
    hint = ""
    in_save_dir = os.path.join(save_dir, os.path.basename(restore))
    if not os.path.isabs(restore) and os.path.isfile(in_save_dir):
        hint = f" (relative names are read from the current directory: did you mean {in_save_dir}?)"
    listing = _checkpoints_listing(save_dir)
    where = f"{save_dir} holds {listing}" if listing else f"{save_dir} holds no checkpoint"
    raise ValueError(
        f"--restore-file {restore}: no such file ({os.path.abspath(read)}){hint}; nothing was "
        f"loaded or written. Give an existing checkpoint ({where}), or leave --restore-file out "
        f"to resume from {os.path.join(save_dir, 'checkpoint_last.pt')} (a fresh start when there "
        f"is none).")


def _check_model_paths(filenames, suffix: str, exists: Callable[[str], bool]) -> None:
    for filename in filenames:
        read = filename.replace(".pt", suffix + ".pt") if suffix else filename
        if not (exists(read) or exists(read[:-3] + "-shard0.pt") or exists(base_path(read))):
            listing = _checkpoints_listing(os.path.dirname(read) or ".")
            raise FileNotFoundError(
                f"checkpoint {read} not found (--path); give the path of a checkpoint file"
                + (f" (its directory holds {listing})" if listing else ""))


# ---------------------------------------------------------------------------------------------
# Installation


OPTIMIZER_STATE_MISFITS = (
    "the optimizer state of the checkpoint does not fit this model's parameters (saved by an "
    "older fairseq-smoe, whose hierarchical MoE kept one parameter per secondary gate, or by a "
    "different model): resume with --reset-optimizer to keep the weights and start new "
    "optimizer moments")


def check_optimizer_state_fits(cfg, model) -> None:
    """After a resume: a module that converted an older state-dict layout on load (it sets
    ``converted_old_state``) had its optimizer moments saved for other parameters. torch
    notices when the number of parameters differs; fairseq's fp16 optimizer flattens all
    parameters into one, where the moments would load silently onto the wrong weights."""
    if getattr(cfg, "reset_optimizer", False):
        return
    if any(getattr(module, "converted_old_state", False) for module in model.modules()):
        raise ValueError(OPTIMIZER_STATE_MISFITS)


class _AtomicCopyPathManager:
    """Stands in for ``PathManager`` inside fairseq.checkpoint_utils: local copies are atomic."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def copy(self, src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        local = not (self._inner.path_requires_pathmanager(src_path)
                     or self._inner.path_requires_pathmanager(dst_path))
        if not local or (not overwrite and os.path.exists(dst_path)):
            return self._inner.copy(src_path, dst_path, overwrite=overwrite)
        atomic_copy(src_path, dst_path)
        return True


_read_from = {}  # id(trainer) -> the file its last load_checkpoint read (set by a trainer hook)


def _continue_batching(loaded, path: str, trainer) -> None:
    """A resume with other batch sizes than the saved run's: move the data position so the
    tokens done stay the same, or warn (distributed.data_position.rescale_for_batching)."""
    from ..distributed.data_position import rescale_for_batching

    extra_state, epoch_itr = loaded
    itr_state = (extra_state or {}).get("train_iterator")
    if not isinstance(itr_state, dict) or not itr_state.get("iterations_in_epoch"):
        return
    saved = peek(base_path(path))
    position, message = rescale_for_batching(itr_state["iterations_in_epoch"],
                                             (saved or {}).get("cfg"), trainer.cfg)
    if message is None:
        return
    logger.warning(message)
    if position != itr_state["iterations_in_epoch"]:
        epoch_itr.load_state_dict(dict(itr_state, iterations_in_epoch=min(position, len(epoch_itr))))


def install() -> None:
    """Idempotent; called by ``compat.install_all`` (after checkpoint_compat)."""
    if not _enabled("SMOE_CHECKPOINT_SAFETY"):
        return
    from fairseq import checkpoint_utils

    if getattr(checkpoint_utils, "_smoe_checkpoint_safety", False):
        return
    checkpoint_utils._smoe_checkpoint_safety = True

    persistent_save = checkpoint_utils.torch_persistent_save
    path_manager = checkpoint_utils.PathManager

    @functools.wraps(persistent_save)
    def torch_persistent_save(obj, filename, async_write: bool = False):
        record_moe_options(obj)
        add_checksum(obj)
        if async_write or not path_manager.supports_rename(filename):
            return persistent_save(obj, filename, async_write=async_write)
        atomic_write(filename, lambda f: torch.save(obj, f))

    checkpoint_utils.torch_persistent_save = torch_persistent_save
    checkpoint_utils.PathManager = _AtomicCopyPathManager(path_manager)

    # checkpoint_utils' own view of torch (checkpoint_compat's stand-in, else a plain one that
    # keeps torch's weights_only default): its load verifies. The real torch.load of the
    # process is untouched.
    view = checkpoint_utils.torch
    if view is torch:
        from .checkpoint_compat import _TorchView

        view = checkpoint_utils.torch = _TorchView()
    view.load = _verified_load(view.load)

    load_checkpoint = checkpoint_utils.load_checkpoint

    @functools.wraps(load_checkpoint)
    def checked_load_checkpoint(cfg, trainer, **passthrough_args):
        check_restore_file(cfg, trainer.checkpoint_suffix, path_manager.isfile)
        if not getattr(cfg, "no_save", False) and getattr(trainer, "data_parallel_rank", 0) == 0 \
                and path_manager.supports_rename(cfg.save_dir):  # a local directory
            from .save_dir_lock import lock_save_dir

            # weights + two Adam moments in fp32, each parameter once (a sharded worker's share)
            check_save_dir(cfg.save_dir, 12 * sum(p.numel() for p in trainer.model.parameters()))
            lock_save_dir(cfg.save_dir)
        logdir = getattr(getattr(trainer.cfg, "common", None), "tensorboard_logdir", None)
        if logdir and getattr(trainer, "data_parallel_rank", 0) == 0:
            check_writable_dir(logdir, "--tensorboard-logdir")
        _read_from.pop(id(trainer), None)
        try:
            loaded = load_checkpoint(cfg, trainer, **passthrough_args)
        except ValueError as error:
            if "doesn't match the size of optimizer's group" not in str(error):
                raise
            # torch's words for an optimizer state saved for other parameters: e.g. a
            # checkpoint from before the hierarchical layer stacked its secondary gates'
            # weights (the model converts on load; Adam's moments cannot).
            raise ValueError(OPTIMIZER_STATE_MISFITS) from None
        check_optimizer_state_fits(cfg, trainer.model)
        read_from = _read_from.pop(id(trainer), None)
        if read_from and not getattr(cfg, "reset_dataloader", False):
            _continue_batching(loaded, read_from, trainer)
        return loaded

    checkpoint_utils.load_checkpoint = checked_load_checkpoint

    def note_file(trainer, filename, extra_state, options):  # the file fairseq resumed from
        _read_from[id(trainer)] = filename

    from .trainer_checkpoint import add_hooks

    add_hooks("CHECKPOINT_SAFETY", load_after=note_file)

    load_ensemble = checkpoint_utils.load_model_ensemble_and_task

    @functools.wraps(load_ensemble)
    def checked_load_ensemble(filenames, arg_overrides=None, task=None, strict=True, suffix="",
                              num_shards=1, state=None):
        if state is None and num_shards == 1:
            _check_model_paths(filenames, suffix, path_manager.exists)
            check_model_overrides(arg_overrides, filenames)
        return load_ensemble(filenames, arg_overrides, task, strict, suffix, num_shards, state)

    checkpoint_utils.load_model_ensemble_and_task = checked_load_ensemble
