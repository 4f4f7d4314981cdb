"""The data position of a run resumed on another number of workers (formula level)."""

import logging

from fairseq_smoe.distributed.data_position import continue_data_position, saved_world_size


def state(iterations, world=4):
    return {"cfg": {"distributed_training": {"distributed_world_size": world}},
            "extra_state": {"train_iterator": {"epoch": 2, "iterations_in_epoch": iterations}}}


def position(s):
    return s["extra_state"]["train_iterator"]["iterations_in_epoch"]


def test_the_batches_done_by_all_workers_are_not_trained_again(caplog):
    caplog.set_level(logging.INFO)
    assert saved_world_size(state(5)) == 4
    assert position(continue_data_position(state(5), 4, 2)) == 10  # 20 batches done
    assert position(continue_data_position(state(5), 4, 8)) == 2  # 20 // 8; 4 batches again
    assert "the last 4 batch(es) before it are trained again" in caplog.text
    assert position(continue_data_position(state(5), 4, 4)) == 5  # same workers: unchanged
    original = state(5)
    continue_data_position(original, 4, 1)
    assert position(original) == 5  # the loaded state is not modified in place


def test_unknown_sizes_and_fresh_epochs_are_left_alone():
    assert position(continue_data_position(state(0), 4, 2)) == 0
    assert continue_data_position({"model": {}}, 4, 2) == {"model": {}}
    assert saved_world_size({"model": {}}) is None
    assert position(continue_data_position(state(3), None, 2)) == 3


def test_other_max_tokens_keeps_the_tokens_done():
    from fairseq_smoe.distributed.data_position import rescale_for_batching

    def cfg(max_tokens=256, batch_size=None, tokens_per_sample=64):
        return {"dataset": {"max_tokens": max_tokens, "batch_size": batch_size,
                            "required_batch_size_multiple": 8},
                "task": {"tokens_per_sample": tokens_per_sample}}

    assert rescale_for_batching(40, cfg(), cfg()) == (40, None)
    assert rescale_for_batching(0, cfg(), cfg(1024)) == (0, None)
    assert rescale_for_batching(40, None, cfg(1024)) == (40, None)  # unknown: nothing to say
    position, message = rescale_for_batching(40, cfg(256), cfg(1024))
    assert position == 10 and "--max-tokens 256 -> 1024" in message and "batch 10 instead of 40" in message
    position, message = rescale_for_batching(10, cfg(1024), cfg(256))
    assert position == 40
    position, message = rescale_for_batching(40, cfg(256), cfg(256, tokens_per_sample=128))
    assert position == 40 and "--tokens-per-sample 64 -> 128" in message
    assert "Resume with --tokens-per-sample 64" in message and "--reset-dataloader" in message
