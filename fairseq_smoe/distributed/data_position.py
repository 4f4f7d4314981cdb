"""Where in the epoch a run resumed on a different number of workers continues.

fairseq stores the data position as ``iterations_in_epoch``: how many batches of *its own
shard* worker 0 had taken. The epoch's batches (shuffled with seed + epoch, the same for any
number of workers) are dealt round-robin to the W shards, so after i iterations on each of W
workers the first i·W batches of the epoch are done. fairseq resumes at iteration i of each
of the M new shards, which on M < W workers trains batches again (and on M > W skips some).

Here the position becomes ⌊i·W / M⌋ on each of the M workers: the first i·W batches are not
trained again. When M does not divide i·W, the remaining i·W mod M (< M) batches are trained
a second time; the log says so.

The same count means another part of the epoch when the batches themselves change size
(``--max-tokens``, ``--batch-size``, ``--tokens-per-sample``): i batches of 256 tokens are a
quarter of i batches of 1024. ``rescale_for_batching`` moves the position by the ratio of the
batch sizes (the tokens done stay about the same) and says so with both figures; where that
ratio is unknown it warns and names the options to restore.
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


BATCHING_OPTIONS = (("dataset", "max_tokens", "--max-tokens"), ("dataset", "batch_size", "--batch-size"),
                    ("task", "tokens_per_sample", "--tokens-per-sample"),
                    ("dataset", "required_batch_size_multiple", "--required-batch-size-multiple"))


def _option(cfg, section: str, name: str):
    try:
        return cfg[section][name]
    except (KeyError, TypeError, AttributeError):
        return getattr(getattr(cfg, section, None), name, None)


def rescale_for_batching(iterations: int, saved_cfg, cfg):
    """(new iterations_in_epoch, message) for a resume whose batching options differ from the
    run that saved the position; (iterations, None) when they agree or nothing was done yet.

    With only --max-tokens changed (the batches hold about that many tokens each), the position
    keeps the tokens done: i · old / new. Any other change warns that the position is off."""
    if not iterations or saved_cfg is None:
        return iterations, None
    changed = [(flag, _option(saved_cfg, section, name), _option(cfg, section, name))
               for section, name, flag in BATCHING_OPTIONS
               if _option(saved_cfg, section, name) != _option(cfg, section, name)]
    if not changed:
        return iterations, None
    said = ", ".join(f"{flag} {old} -> {new}" for flag, old, new in changed)
    if [flag for flag, _, _ in changed] == ["--max-tokens"] and all(
            isinstance(v, int) and v > 0 for _, v, _ in changed) and changed[0][2]:
        old, new = changed[0][1], changed[0][2]
        position = max(0, round(iterations * old / new))
        return position, (f"resuming with other batches ({said}): the epoch continues at batch "
                          f"{position} instead of {iterations}, after about the same "
                          f"{iterations * old:,} tokens (batches hold up to --max-tokens each; "
                          f"resume with --max-tokens {old} to continue exactly)")
    restore = " ".join(f"{flag} {old}" for flag, old, _ in changed)
    return iterations, (f"resuming with other batches ({said}): the saved position, batch "
                        f"{iterations} of the epoch, counts batches of the old size, so part of "
                        f"this epoch is skipped or trained twice. Resume with {restore} to "
                        f"continue exactly, or add --reset-dataloader to start the epoch afresh")
