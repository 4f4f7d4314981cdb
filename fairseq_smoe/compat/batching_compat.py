"""Keep fairseq from silently dropping the last batch of a dataset.

fairseq 0.12's ``data_utils.batch_by_size`` discards the final batch whenever its size is not a
multiple of ``--required-batch-size-multiple`` (default 8): ``fairseq-generate`` on a
100-sentence test set translates 96 sentences, ``fairseq-eval-lm`` and validation skip the tail
of the data, and nothing says so. The multiple exists for hardware efficiency, never to lose
data, so we put the discarded examples back as the last (smaller) batch. Every other batch is
unchanged.

This changes the batches of every model trained in the process, fairseq's own included: one
more batch per epoch wherever fairseq dropped the tail, so the batch count and the shuffled
data order differ from a run without the plugin (docs/compat.md).
"""

import functools

import numpy as np


def _keep_last_batch(batch_by_size):
    @functools.wraps(batch_by_size)
    def wrapped(indices, num_tokens_fn, num_tokens_vec=None, max_tokens=None, max_sentences=None,
                required_batch_size_multiple=1, fixed_shapes=None):
        batches = batch_by_size(indices, num_tokens_fn, num_tokens_vec, max_tokens, max_sentences,
                                required_batch_size_multiple, fixed_shapes)
        if fixed_shapes is not None:
            return batches
        indices = np.asarray(indices if isinstance(indices, np.ndarray) else list(indices), dtype=np.int64)
        batched = sum(len(batch) for batch in batches)
        if batched < len(indices):
            # Batches are consecutive runs of ``indices``: the dropped one is the tail.
            batches = list(batches) + [indices[batched:]]
        return batches

    wrapped._smoe_keeps_last_batch = True
    return wrapped


def install() -> None:
    """Idempotent; called by ``compat.install_all`` (``SMOE_PATCH_LAST_BATCH=0``: not at all)."""
    from fairseq.data import data_utils

    if not getattr(data_utils.batch_by_size, "_smoe_keeps_last_batch", False):
        data_utils.batch_by_size = _keep_last_batch(data_utils.batch_by_size)
