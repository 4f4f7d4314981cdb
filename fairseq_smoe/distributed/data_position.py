"""Where in the epoch a run resumed on a different number of workers continues.

fairseq stores the data position as ``iterations_in_epoch``: how many batches of *its own
shard* worker 0 had taken. The epoch's batches (shuffled with seed + epoch, the same for any
number of workers) are dealt round-robin to the W shards, so after i iterations on each of W
workers the first i·W batches of the epoch are done. fairseq resumes at iteration i of each
of the M new shards, which on M < W workers trains batches again (and on M > W skips some).

Here the position becomes ⌊i·W / M⌋ on each of the M workers: the first i·W batches are not
trained again. When M does not divide i·W, the remaining i·W mod M (< M) batches are trained
a second time; the log says so.
"""

import logging
from typing import Optional

logger = logging.getLogger(__name__)


def saved_world_size(state: dict) -> Optional[int]:
    """Data-parallel workers of the run that wrote ``state`` (from its configuration)."""
    cfg = state.get("cfg")
    try:
        if cfg is not None:
            return int(cfg["distributed_training"]["distributed_world_size"])
        if state.get("args") is not None:
            return int(state["args"].distributed_world_size)
    except (KeyError, TypeError, AttributeError, ValueError):
        pass
    return None


def current_world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def continue_data_position(state: dict, saved_world: Optional[int], world: int) -> dict:
    """``state`` with its train iterator moved to the same batch of the epoch for ``world``
    workers (a shallow copy; unchanged when the sizes agree or are unknown)."""
    extra = state.get("extra_state") or {}
    itr = extra.get("train_iterator")
    if not saved_world or saved_world == world or not isinstance(itr, dict):
        return state
    done = int(itr.get("iterations_in_epoch") or 0) * saved_world
    if done == 0:
        return state
    position, repeated = divmod(done, world)
    note = (f"; the last {repeated} batch(es) before it are trained again" if repeated else "")
    logger.info(f"resuming {saved_world}-worker training on {world} worker(s): epoch "
                f"{itr.get('epoch')} continues after its first {done} batches (iteration "
                f"{position} of each worker's shard){note}")
    moved = dict(state)
    moved["extra_state"] = dict(extra, train_iterator=dict(itr, iterations_in_epoch=position))
    return moved
