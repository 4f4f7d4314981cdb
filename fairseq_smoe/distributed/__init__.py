"""Expert parallelism (paper §3.1): data-parallel everything, experts sharded across workers.

All torch.distributed code of the plugin lives in this package:

    all_to_all.py       differentiable variable-size all-to-all; differentiable sum over workers
    expert_parallel.py  ExpertParallel: a layer's backend wrapped to run each expert on the
                        worker that holds it; shard_layer: a worker's share of a layer's experts
    checkpoints.py      per-worker checkpoint files; merge / reshard on load
    data_position.py    where in the epoch a resume on another worker count continues

What fairseq's trainer does differently for sharded experts (every worker saves; the clip norm
counts each expert once) is a patch of fairseq: ``fairseq_smoe/compat/trainer_hooks.py``.

This package knows nothing of fairseq. The fairseq models call
``models/parallel.setup_expert_parallel(model, args)`` at the end of ``build_model``, which reads
their options and applies what is here.
"""

from .all_to_all import SumOverWorkers, all_to_all
from .expert_parallel import ExpertParallel, check_shardable, expert_range, shard_layer

__all__ = ["ExpertParallel", "SumOverWorkers", "all_to_all", "check_shardable",
           "expert_range", "shard_layer"]
