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
