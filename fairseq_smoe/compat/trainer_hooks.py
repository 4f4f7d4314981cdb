"""fairseq ``Trainer`` patches: sharded experts (``SMOE_PATCH_EXPERT_PARALLEL``) and the
plain-criterion warning (``SMOE_PATCH_CRITERION_CHECK``). Installed by ``compat.install_all``.

fairseq assumes every worker holds the same parameters. With expert parallelism it does not,
so, only for models whose experts ``setup_expert_parallel`` sharded (otherwise nothing changes):

* Saving: every worker saves (fairseq saves on worker 0 only), worker r > 0 under fairseq's
  file names with the suffix ``-expert-shard{r}``; files carry ``moe_expert_shards`` metadata.
* Loading: every worker reads the checkpoint itself (no broadcast of worker 0's experts), and
  ``load_checkpoint_to_cpu`` merges or reshards expert-parallel checkpoints for whatever this
  process holds (``checkpoints.load_for_this_process``) — also in fairseq-eval-lm/-generate.
* Gradient clipping: the norm counts the replicated parameters once and each expert once
  (all-reduce of the experts' squared norms); fairseq's own ``clip_grad_norm_`` leaves
  ``expert`` parameters out of the norm altogether.
"""

import logging
import uuid
import weakref

import torch
import torch.distributed as dist

from ..checkpoint_files import base_path, shard_suffix
from ..distributed.checkpoints import SHARD_META_KEY, expert_plan, load_for_this_process

logger = logging.getLogger(__name__)

_sharded_model = None  # weakref to the model whose experts this process holds a share of
_group = None
_run_id = None  # shared by the workers of this training: in every shard file's metadata


def register_sharded_model(model, group) -> None:
    """Called on every worker when its experts are sharded: worker 0 draws the run id and
    broadcasts it, so the W files of each save name the same training."""
    global _sharded_model, _group, _run_id
    _sharded_model, _group = weakref.ref(model), group
    token = [uuid.uuid4().hex[:16] if dist.get_rank(group) == 0 else None]
    source = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast_object_list(token, src=source, group=group)
    _run_id = token[0]


def _active_model():
    model = _sharded_model() if _sharded_model is not None else None
    return model if model is not None and dist.is_initialized() else None


def _is_sharded(model) -> bool:
    active = _active_model()
    return active is not None and model is active


def current_plan():
    model = _active_model()
    if model is None or not dist.is_initialized():
        return None
    plan = expert_plan(model, dist.get_rank(_group), dist.get_world_size(_group))
    if plan is not None:
        plan["run_id"] = _run_id
    return plan


def clip_grad_norm_with_sharded_experts(params, max_norm, aggregate_norm_fn=None) -> torch.Tensor:
    """fairseq's ``utils.clip_grad_norm_`` where each expert counts once in the norm:

        ‖g‖² = Σ_replicated ‖g_p‖² + Σ_workers Σ_local experts ‖g_e‖²
    """
    params = [params] if torch.is_tensor(params) else list(params)
    dense, experts = [], []
    for p in params:
        if getattr(p, "grad", None) is not None:
            (experts if getattr(p, "expert", False) else dense).append(p.grad.detach())
    device = (dense + experts)[0].device if dense + experts else torch.device("cpu")
    if _group is not None and dist.get_backend(_group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())

    def squared_norm(grads):
        total = torch.zeros((), dtype=torch.float32, device=device)
        for g in grads:
            total = total + torch.norm(g, p=2, dtype=torch.float32).to(device) ** 2
        return total

    expert_sq = squared_norm(experts)
    dist.all_reduce(expert_sq, group=_group)  # every worker calls this, with or without grads
    total_norm = (squared_norm(dense) + expert_sq).sqrt()
    if aggregate_norm_fn is not None:
        total_norm = aggregate_norm_fn(total_norm)
    if max_norm > 0 and dense + experts:
        clip_coef = (float(max_norm) / (total_norm + 1e-6)).clamp_(max=1)
        grads = dense + experts
        torch._foreach_mul_(grads, clip_coef.to(grads[0].device))
    return total_norm


def install() -> None:
    """The expert-parallel hooks. Idempotent; called by ``compat.install_all``."""
    from fairseq import checkpoint_utils, utils
    from fairseq.trainer import Trainer

    if getattr(Trainer, "_smoe_expert_parallel_hooks", False):
        return
    Trainer._smoe_expert_parallel_hooks = True

    should_save = Trainer.should_save_checkpoint_on_current_rank
    suffix = Trainer.checkpoint_suffix
    state_dict = Trainer.state_dict

    def should_save_checkpoint_on_current_rank(self):
        return _is_sharded(self._model) or should_save.fget(self)

    def checkpoint_suffix(self):
        own = suffix.fget(self)
        if _is_sharded(self._model):
            own = own + shard_suffix(self.data_parallel_rank)
        return own

    def trainer_state_dict(self):
        state = state_dict(self)
        if _is_sharded(self._model):
            state[SHARD_META_KEY] = current_plan()
        return state

    def load_before(trainer, filename):
        if _is_sharded(trainer._model):
            from omegaconf import open_dict

            # Every worker reads what it needs (its own experts), instead of worker 0's
            # state being broadcast to all.
            with open_dict(trainer.cfg.checkpoint):
                trainer.cfg.checkpoint.load_checkpoint_on_all_dp_ranks = True
            filename = base_path(filename)
        return filename

    Trainer.should_save_checkpoint_on_current_rank = property(should_save_checkpoint_on_current_rank)
    Trainer.checkpoint_suffix = property(checkpoint_suffix)
    Trainer.state_dict = trainer_state_dict
    from .trainer_checkpoint import add_hooks

    add_hooks("EXPERT_PARALLEL", load_before=load_before)

    load_to_cpu = checkpoint_utils.load_checkpoint_to_cpu

    def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
        def load_one(p):
            return load_to_cpu(p, arg_overrides, load_on_all_ranks)

        return load_for_this_process(path, load_one, current_plan())

    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu

    clip = utils.clip_grad_norm_

    def clip_grad_norm_(params, max_norm, aggregate_norm_fn=None):
        if _active_model() is None:
            return clip(params, max_norm, aggregate_norm_fn)
        return clip_grad_norm_with_sharded_experts(params, max_norm, aggregate_norm_fn)

    utils.clip_grad_norm_ = clip_grad_norm_


# ---------------------------------------------------------------------------------------------
# An MoE model trained by a criterion that ignores the balance losses

_warned_criteria = set()


def balance_ignored_warning(model, criterion):
    """The warning for ``model`` trained with ``criterion``, or None when nothing is wrong."""
    from ..modules.moe_layer import MoELayerBase

    if getattr(criterion, "consumes_moe_balance", False):
        return None
    if not any(isinstance(m, MoELayerBase) for m in model.modules()):
        return None
    name = getattr(criterion, "__class__", type(criterion)).__name__
    return (f"the model has Mixture-of-Experts layers but the criterion ({name}) ignores their "
            f"balance losses (--moe-w-importance, --moe-w-load): the gates are free to collapse "
            f"onto a few experts. Use --criterion smoe_cross_entropy (or "
            f"smoe_label_smoothed_cross_entropy for translation; criterion._name: "
            f"smoe_cross_entropy in a hydra config)")


def install_criterion_check() -> None:
    """Wrap ``Trainer.__init__``: warn once per criterion type. Idempotent."""
    from fairseq.trainer import Trainer

    if getattr(Trainer, "_smoe_criterion_check", False):
        return
    Trainer._smoe_criterion_check = True
    init = Trainer.__init__

    def trainer_init(self, cfg, task, model, criterion, *args, **kwargs):
        init(self, cfg, task, model, criterion, *args, **kwargs)
        message = balance_ignored_warning(model, criterion)
        if message is not None and type(criterion) not in _warned_criteria:
            _warned_criteria.add(type(criterion))
            logger.warning(message)

    Trainer.__init__ = trainer_init
