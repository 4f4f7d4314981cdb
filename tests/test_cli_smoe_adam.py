"""``fairseq-train --optimizer smoe_adam`` end to end (the tiny LSTM-MoE LM of
test_cli_distributed.py, PTB sentences, CPU):

* the loss falls; the experts' optimizer state is > 90 % smaller than Adam's would be;
* resuming from a mid-run checkpoint ends exactly where the uninterrupted run ended
  (--clip-norm, --update-freq 2);
* one update of two expert-parallel workers equals one update of one worker on the union of
  their batches, and their factored state merges into the one-process layout; one worker
  resumes the two-worker run.

Deterministic gates and no balance loss (as in the expert-parallel gradient test); a large ε
keeps Adam's first step a smooth function of the gradient, g/(|g|+ε), so that two workers and
one process, which sum in other orders, agree to rounding.
"""

import shutil

import pytest
import torch
from test_cli_distributed import corpus, merged_model, train, train_losses  # noqa: F401

pytestmark = pytest.mark.slow

EXPERT_KEYS = ["decoder.moe.moe.experts.weights.0", "decoder.moe.moe.experts.weights.1",
               "decoder.moe.moe.experts.biases.0", "decoder.moe.moe.experts.biases.1"]
EXPERT_PARAMS = 4 * (32 * 48 + 48 + 48 * 32 + 32)  # the model of test_cli_distributed
OPT = ["--optimizer", "smoe_adam", "--adam-eps", "1e-3", "--lr", "0.01", "--clip-norm", "0.5",
       "--moe-gating", "top_k", "--moe-w-importance", "0", "--moe-w-load", "0",
       "--disable-validation", "--no-epoch-checkpoints", "--save-interval-updates", "1"]


def load(path):
    return torch.load(path, weights_only=False)


def expert_slots(state):
    """Optimizer state indices of the expert parameters (model parameter order)."""
    names = [k for k in state["model"] if not k.endswith("_float_tensor")]
    return [i for i, k in enumerate(names) if k in EXPERT_KEYS]


def assert_optimizer_states_equal(a, b, **tolerance):
    for index, entry in a["last_optimizer_state"]["state"].items():
        other = b["last_optimizer_state"]["state"][index]
        assert sorted(other) == sorted(entry)
        for name, value in entry.items():
            if not torch.is_tensor(value):
                assert other[name] == value
            elif tolerance:
                torch.testing.assert_close(other[name], value, **tolerance)
            else:
                assert torch.equal(other[name], value), (index, name)


@pytest.fixture(scope="module")
def one_worker(corpus, tmp_path_factory):  # noqa: F811
    save_dir = tmp_path_factory.mktemp("smoe_adam")
    output = train(corpus, save_dir, *OPT, "--update-freq", "2", "--max-update", "4", workers=1)
    return save_dir, output


def test_loss_falls_and_expert_state_is_under_a_tenth_of_adams(one_worker):
    save_dir, output = one_worker
    losses = train_losses(output)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1, losses
    state = load(save_dir / "checkpoint_last.pt")
    slots = expert_slots(state)
    opt_state = state["last_optimizer_state"]["state"]
    assert len(slots) == 4 and all(i in opt_state for i in slots)
    numel = sum(t.numel() for i in slots for t in opt_state[i].values() if torch.is_tensor(t))
    assert numel < 0.1 * 2 * EXPERT_PARAMS, numel  # Adam: 2 moments of every expert parameter
    weight = opt_state[slots[0]]
    assert sorted(weight) == ["exp_avg_sq_col", "exp_avg_sq_row", "step"] and weight["step"] == 4
    assert weight["exp_avg_sq_row"].shape == (4, 32) and weight["exp_avg_sq_col"].shape == (4, 48)
    shared = opt_state[0]
    assert sorted(shared) == ["exp_avg", "exp_avg_sq", "step"]


def test_resume_continues_exactly(one_worker, corpus, tmp_path):  # noqa: F811
    save_dir, output = one_worker
    shutil.copy(save_dir / "checkpoint_1_2.pt", tmp_path / "checkpoint_last.pt")
    resumed = train(corpus, tmp_path, *OPT, "--update-freq", "2", "--max-update", "4", workers=1)
    assert "Loaded checkpoint" in resumed
    assert train_losses(resumed) == train_losses(output)[2:]
    expected, got = load(save_dir / "checkpoint_1_4.pt"), load(tmp_path / "checkpoint_1_4.pt")
    for key, value in expected["model"].items():
        assert torch.equal(got["model"][key], value), key
    assert_optimizer_states_equal(expected, got)


def test_two_expert_parallel_workers_then_one(one_worker, corpus, tmp_path):  # noqa: F811
    from fairseq import checkpoint_utils

    two = train(corpus, tmp_path, *OPT, "--max-update", "1")
    assert "expert parallelism: worker 0 holds" in two
    shard1 = load(tmp_path / "checkpoint_last-expert-shard1.pt")
    assert shard1["model"][EXPERT_KEYS[0]].shape[0] == 2
    assert shard1["last_optimizer_state"]["state"][expert_slots(shard1)[0]]["exp_avg_sq_row"] \
        .shape == (2, 32)
    one_path = str(one_worker[0] / "checkpoint_1_1.pt")
    two_model = merged_model(str(tmp_path / "checkpoint_last.pt"))
    for key, value in merged_model(one_path).items():
        torch.testing.assert_close(two_model[key], value, atol=2e-5, rtol=1e-5)
    merged = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "checkpoint_last.pt"))
    assert_optimizer_states_equal(load(one_path), merged, atol=1e-9, rtol=1e-4)
    # one worker resumes the two-worker run: the shards merge on load, state included
    resumed = train(corpus, tmp_path, *OPT, "--update-freq", "2", "--max-update", "2", workers=1)
    assert "merging the expert shards of 2 workers" in resumed and "Loaded checkpoint" in resumed
    assert len(train_losses(resumed)) == 1
    final = load(tmp_path / "checkpoint_last.pt")
    assert "moe_expert_shards" not in final
    weight = final["last_optimizer_state"]["state"][expert_slots(final)[0]]
    assert weight["step"] == 2 and weight["exp_avg_sq_row"].shape == (4, 32)
