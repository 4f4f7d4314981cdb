"""Expert parallelism for the fairseq models: their options applied to the layers at build time.

``setup_expert_parallel(model, args)``, called at the end of each model's ``build_model``, reads
``--moe-expert-parallel`` and fairseq's data-parallel group and uses ``fairseq_smoe.distributed``
(which knows nothing of fairseq) to sum the balance statistics over the workers and shard the
experts; the trainer's side of sharded experts is the EXPERT_PARALLEL patch
(``compat/trainer_hooks.py``), which this registers the model with.
"""

import logging

import torch.distributed as dist

from .. import compat
from ..compat import trainer_hooks
from ..distributed import SumOverWorkers, check_shardable, expert_range, shard_layer
from ..modules.moe_layer import MoELayerBase

logger = logging.getLogger(__name__)


def check_expert_parallel_options(args) -> None:
    """Options whose gradient or checkpoint handling assumes identical parameters everywhere."""
    def flag(name, default=None):
        return getattr(args, name, default)

    problems = []
    if flag("ddp_backend") == "fully_sharded":
        problems.append("--ddp-backend fully_sharded (use legacy_ddp or pytorch_ddp)")
    if flag("use_bmuf"):
        problems.append("--use-bmuf")
    if (flag("model_parallel_size", 1) or 1) > 1:
        problems.append("--model-parallel-size > 1")
    if flag("store_ema"):
        problems.append("--store-ema")
    if flag("zero_sharding", "none") not in (None, "none"):
        problems.append("--zero-sharding os")
    if ((flag("fp16") or flag("bf16")) and not flag("memory_efficient_fp16")
            and not flag("memory_efficient_bf16") and not flag("fp16_no_flatten_grads")):
        problems.append("--fp16/--bf16 with flattened fp32 gradients (add --fp16-no-flatten-grads "
                        "or use --memory-efficient-fp16)")
    if problems:
        raise ValueError("expert parallelism (--moe-expert-parallel, the default in distributed "
                         "training) does not support " + "; ".join(problems)
                         + ". Change these options or pass --no-moe-expert-parallel.")


def setup_expert_parallel(model, args):
    """Prepare the MoE layers of ``model`` for distributed data-parallel training. Returns the model.

    When torch.distributed is initialised with W > 1 workers:
      * every MoE layer sums Importance and Load over the workers before the CV² (§1.2);
      * with ``--moe-expert-parallel`` (the default), each worker keeps only its 1/W of every
        layer's experts (``shard_layer``: the layer's ``experts`` become the share, its
        ``wrap_backend`` an ``ExpertParallel``; whole groups for hierarchical layers). The
        expert parameters are excluded from DDP's all-reduce and broadcast, and their
        gradients are divided by W to match DDP's averaging of the replicated gradients.
        A W that does not divide the experts (groups) raises a ValueError here.
    In a single process this does nothing.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return model
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayerBase)]
    if not layers:
        return model
    try:
        from fairseq.distributed import utils as distributed_utils

        group = distributed_utils.get_data_parallel_group()
    except ImportError:
        group = None
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    expert_parallel = getattr(args, "moe_expert_parallel", True) is not False
    if expert_parallel:  # all errors before anything changes
        if not compat.enabled("EXPERT_PARALLEL"):
            raise ValueError("expert parallelism (--moe-expert-parallel, the default in distributed "
                             "training) needs the plugin's trainer hooks, switched off by "
                             "SMOE_PATCH_EXPERT_PARALLEL=0: unset it or pass --no-moe-expert-parallel")
        check_expert_parallel_options(args)
        for name, layer in layers:
            check_shardable(layer, world_size, name)
    for _, layer in layers:
        layer.sum_over_workers = SumOverWorkers(group)
    if not expert_parallel:
        logger.info(f"expert parallelism off: {len(layers)} MoE layer(s) replicated on "
                    f"{world_size} workers; balance statistics summed over workers")
        return model

    for name, layer in layers:
        shard_layer(layer, group, grad_scale=1.0 / world_size, name=name)

    ignored = [name for name, p in model.named_parameters() if getattr(p, "moe_expert_shard", False)]
    existing = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = existing + [n for n in ignored if n not in existing]
    local = sum(p.numel() for n, p in model.named_parameters() if n in set(ignored))
    for name, layer in layers:
        first, end = expert_range(layer.num_experts, rank, world_size)
        logger.info(f"expert parallelism: worker {rank} of {world_size} holds experts "
                    f"{first}..{end - 1} of {layer.num_experts} in MoE layer '{name}'")
    logger.info(f"expert parallelism: worker {rank} holds {local:,} expert parameters "
                f"(1/{world_size} of the model's experts)")

    trainer_hooks.register_sharded_model(model, group)
    return model
