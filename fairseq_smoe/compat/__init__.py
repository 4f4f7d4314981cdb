"""Every change fairseq-smoe makes to fairseq, in one place, each with an off switch.

Nothing here runs on import: ``install_all()`` installs the patches, and only them. fairseq
calls it through ``--user-dir fairseq_smoe`` (its ``import_models`` imports
``fairseq_smoe.models``, whose ``__init__`` calls it and then registers the plugin's models,
criteria, lr scheduler and optimizer). A Python program that drives fairseq in-process calls
``fairseq_smoe.plugin.install()``, which does both. ``fairseq_smoe.modules`` (the layer) never
imports this package.

The trainer's own checkpoint methods are wrapped once (``trainer_checkpoint.py``); the patches
that act around them register hooks there, in the order its ``ORDER`` table gives.

Each patch is switched off with ``SMOE_PATCH_<NAME>=0`` (also ``false``/``no``/``off``); the
table with what each one changes and why is docs/compat.md. The patches apply to the whole
process once installed, i.e. to every model fairseq trains in it, not only ours.

    NAME                 module               what it changes in fairseq 0.12
    CHECKPOINT_LOAD      checkpoint_compat    checkpoint_utils' torch.load: weights_only=False
    CHECKPOINT_SAFETY    checkpoint_safety    atomic saves, checksums, missing-file errors
    NUMPY2               numpy_compat         np.compat.long for NumPy 2
    LAST_BATCH           batching_compat      batch_by_size keeps the last partial batch
    EXPERT_PARALLEL      trainer_hooks        Trainer save/load, clip_grad_norm_ for sharded experts
    CRITERION_CHECK      trainer_hooks        Trainer warns once: MoE model + criterion without balance
    FP16_EXPERTS         fairseq_smoe.optim   FP16Optimizer's fp32 copies keep the expert marks
    CLI_ERRORS           cli_errors           sys.excepthook in fairseq-* commands: one-line errors
    BF16_CUDA            bf16_cuda            --bf16 on a GPU trains in CUDA bf16 (fairseq: TPU only)
    PATIENCE_RESUME      patience_resume      Trainer save/load keep --patience's count over a resume
    INTERACTIVE_INPUT    interactive_input    fairseq-interactive skips input lines that are not UTF-8
"""

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List

_OFF = ("0", "false", "no", "off")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Patch:
    name: str  # SMOE_PATCH_<name> switches it off
    module: str  # fairseq_smoe.compat.<module> (or a full dotted path)
    install: str  # function of that module
    changes: str  # one line for docs and logs
    aliases: tuple = ()  # older environment variables that also switch it off

    @property
    def variable(self) -> str:
        return f"SMOE_PATCH_{self.name}"

    def enabled(self) -> bool:
        return all(os.environ.get(v, "1").strip().lower() not in _OFF
                   for v in (self.variable, *self.aliases))


# In installation order: checkpoint_safety wraps checkpoint_compat's torch.load.
PATCHES: List[Patch] = [
    Patch("CHECKPOINT_LOAD", "checkpoint_compat", "install",
          "fairseq.checkpoint_utils' torch.load defaults to weights_only=False (torch >= 2.6)"),
    Patch("CHECKPOINT_SAFETY", "checkpoint_safety", "install",
          "atomic checkpoint files, checksums verified on load, one-line errors for missing "
          "--restore-file/--path", aliases=("SMOE_CHECKPOINT_SAFETY",)),
    Patch("NUMPY2", "numpy_compat", "install", "defines np.compat.long (removed in NumPy 2)"),
    Patch("LAST_BATCH", "batching_compat", "install",
          "data_utils.batch_by_size keeps the last partial batch (every model in the process)"),
    Patch("EXPERT_PARALLEL", "trainer_hooks", "install",
          "Trainer saves/loads per-worker expert shards; clip_grad_norm_ counts each expert once"),
    Patch("CRITERION_CHECK", "trainer_hooks", "install_criterion_check",
          "Trainer warns once when an MoE model trains with a criterion that drops the balance "
          "losses"),
    Patch("FP16_EXPERTS", "fairseq_smoe.optim.smoe_adam", "install_fp16_hook",
          "FP16Optimizer's fp32 master copies keep the expert marks smoe_adam needs"),
    Patch("CLI_ERRORS", "cli_errors", "install",
          "sys.excepthook of fairseq-* commands prints our configuration errors as one line"),
    Patch("BF16_CUDA", "bf16_cuda", "install",
          "--bf16 with CUDA and without torch_xla trains in CUDA bf16 instead of asking torch_xla "
          "for a TPU"),
    Patch("PATIENCE_RESUME", "patience_resume", "install",
          "checkpoints keep --patience's count (best score, epochs without improvement) and a "
          "resume restores it"),
    Patch("INTERACTIVE_INPUT", "interactive_input", "install",
          "fairseq-interactive skips (with a warning) input lines that are not UTF-8 instead of "
          "stopping"),
]

_installed: Dict[str, bool] = {}
_started = False


def _function(patch: Patch) -> Callable[[], None]:
    name = patch.module if "." in patch.module else f"{__name__}.{patch.module}"
    return getattr(importlib.import_module(name), patch.install)


def install_all() -> Dict[str, bool]:
    """Install every enabled patch. Idempotent. (Registration is fairseq_smoe.models' job:
    ``fairseq_smoe.plugin.install()`` does both.)

    Returns {patch name: installed?}."""
    global _started
    if _started:
        return dict(_installed)
    _started = True
    for patch in PATCHES:
        on = patch.enabled()
        if on:
            _function(patch)()
        _installed[patch.name] = on
    off = [p.variable for p in PATCHES if not _installed[p.name]]
    if off:
        logger.info(f"fairseq-smoe: patches of fairseq switched off: {', '.join(off)}")
    return dict(_installed)


def installed() -> Dict[str, bool]:
    """{patch name: installed?} of this process (empty before install_all)."""
    return dict(_installed)


def enabled(name: str) -> bool:
    """Whether patch ``name`` was installed (after install_all) or is switched on."""
    if name in _installed:
        return _installed[name]
    return next(p for p in PATCHES if p.name == name).enabled()
