"""Per-worker checkpoint files: merge, reshard, file naming, errors (no processes needed)."""

import os
from collections import OrderedDict

import pytest
import torch
from conftest import load_script

from fairseq_smoe.checkpoint_files import CHECKSUM_KEY, add_checksum, verify_and_strip
from fairseq_smoe.distributed.checkpoints import (
    SHARD_META_KEY,
    base_path,
    load_for_this_process,
    merge_expert_shards,
    select_expert_shard,
    shard_path,
)
from fairseq_smoe.distributed.expert_parallel import check_shardable, expert_range
from fairseq_smoe.modules import HierarchicalMoELayer, MoELayer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"dec.moe.experts.weights.0": 8, "dec.moe.experts.biases.0": 8}
SLOTS = {1: 8, 2: 8}


def full_state():
    """A fairseq-like checkpoint with 8 experts: model, Adam-like optimizer state, progress."""
    torch.manual_seed(0)
    model = OrderedDict([("dec.embed.weight", torch.randn(5, 3)),
                         ("dec.moe.experts.weights.0", torch.randn(8, 3, 4)),
                         ("dec.moe.experts.biases.0", torch.randn(8, 4))])
    state = {0: {"step": 3, "exp_avg": torch.randn(5, 3), "exp_avg_sq": torch.rand(5, 3)}}
    for index, key in ((1, "dec.moe.experts.weights.0"), (2, "dec.moe.experts.biases.0")):
        state[index] = {"step": 3, "exp_avg": torch.randn_like(model[key]),
                        "exp_avg_sq": torch.rand_like(model[key])}
    return {"model": model, "last_optimizer_state": {"state": state, "param_groups": [{"params": [0, 1, 2]}]},
            "optimizer_history": [{"num_updates": 3}],
            "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 6}}}


def plan(rank, world):
    return {"world_size": world, "rank": rank, "model_keys": dict(KEYS), "optimizer_slots": dict(SLOTS)}


def assert_states_equal(a, b):
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0)
    for index, entry in a["last_optimizer_state"]["state"].items():
        for name, value in entry.items():
            other = b["last_optimizer_state"]["state"][index][name]
            if torch.is_tensor(value):
                torch.testing.assert_close(value, other, rtol=0, atol=0)
            else:
                assert value == other


def test_shard_then_merge_is_identity():
    full = full_state()
    shards = [select_expert_shard(full, plan(r, 2)) for r in range(2)]
    assert shards[1]["model"]["dec.moe.experts.weights.0"].shape[0] == 4
    torch.testing.assert_close(shards[1]["model"]["dec.moe.experts.weights.0"],
                               full["model"]["dec.moe.experts.weights.0"][4:])
    assert shards[1]["last_optimizer_state"]["state"][1]["exp_avg"].shape[0] == 4
    assert shards[1]["last_optimizer_state"]["state"][0]["exp_avg"].shape[0] == 5  # replicated
    merged = merge_expert_shards(shards)
    assert SHARD_META_KEY not in merged
    assert_states_equal(merged, full)


def write_run(tmp_path, world):
    full = full_state()
    base = str(tmp_path / "checkpoint_last.pt")
    for rank in range(world):
        torch.save(select_expert_shard(full, plan(rank, world)), shard_path(base, rank))
    return full, base


def load(path):
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("saved, loading", [(2, None), (2, 2), (2, 4), (4, 2), (4, 1), (2, 8)])
def test_load_for_any_number_of_workers(tmp_path, saved, loading):
    full, base = write_run(tmp_path, saved)
    for rank in range(loading or 1):
        target = plan(rank, loading) if loading else None
        # each worker may be handed its own suffixed name (fairseq's checkpoint_suffix)
        got = load_for_this_process(shard_path(base, rank if loading == saved else 0), load, target)
        expected = full if target is None else select_expert_shard(full, target)
        assert_states_equal(got, expected)


def test_full_checkpoint_is_cut_for_sharded_workers(tmp_path):
    full = full_state()
    path = str(tmp_path / "model.pt")
    torch.save(full, path)
    got = load_for_this_process(path, load, plan(1, 2))
    torch.testing.assert_close(got["model"]["dec.moe.experts.biases.0"],
                               full["model"]["dec.moe.experts.biases.0"][4:])
    assert load_for_this_process(path, load, None)["model"].keys() == full["model"].keys()


def test_missing_or_mismatched_shards_are_clear_errors(tmp_path):
    full, base = write_run(tmp_path, 2)
    other = select_expert_shard(full, plan(1, 2))
    other["optimizer_history"] = [{"num_updates": 9}]
    torch.save(other, shard_path(base, 1))
    with pytest.raises(ValueError, match="different saves"):
        load_for_this_process(base, load, None)
    os.remove(shard_path(base, 1))
    with pytest.raises(FileNotFoundError, match=r"checkpoint_last-expert-shard1\.pt"):
        load_for_this_process(base, load, None)


def test_shards_of_two_runs_at_the_same_progress_are_refused(tmp_path):
    """Two trainings wrote one --save-dir: worker 0's file of one, worker 1's of the other,
    same progress, other weights. The run id in the shard metadata tells them apart."""
    def save(seed, rank, run_id):
        torch.manual_seed(seed)
        state = select_expert_shard(full_state(), dict(plan(rank, 2), run_id=run_id))
        torch.save(state, shard_path(str(tmp_path / "checkpoint_last.pt"), rank))

    save(1, 0, "aaaa")
    save(2, 1, "bbbb")
    for target in (None, plan(0, 2), plan(1, 2)):
        with pytest.raises(ValueError, match="come from different trainings") as error:
            load_for_this_process(str(tmp_path / "checkpoint_last.pt"), load, target)
        assert "--save-dir" in str(error.value)
    save(2, 0, "bbbb")  # both files of one run: loads
    assert load_for_this_process(str(tmp_path / "checkpoint_last.pt"), load, None)["model"]


def test_file_names():
    assert shard_path("d/checkpoint_best.pt", 0) == "d/checkpoint_best.pt"
    assert shard_path("d/checkpoint_best.pt", 3) == "d/checkpoint_best-expert-shard3.pt"
    assert base_path("d/checkpoint_1_6-expert-shard3.pt") == "d/checkpoint_1_6.pt"
    assert base_path("d/checkpoint_best.pt") == "d/checkpoint_best.pt"
    assert expert_range(8, 1, 4) == (2, 4)


def test_world_size_must_divide_experts_or_groups():
    with pytest.raises(ValueError, match="--moe-num-experts that is a multiple of 2"):
        check_shardable(MoELayer(4, 4, num_experts=3, hidden_dim=4, k=2), 2)
    hierarchical = HierarchicalMoELayer(4, 4, num_groups=3, experts_per_group=4, hidden_dim=4)
    with pytest.raises(ValueError, match="whole groups"):  # 12 experts, but 3 groups
        check_shardable(hierarchical, 2)
    check_shardable(HierarchicalMoELayer(4, 4, num_groups=4, experts_per_group=3, hidden_dim=4), 2)


def reshard_script():
    return load_script("reshard_experts")


def refused(script, capsys, *argv):
    """reshard_experts.py's error line (argparse style, exit status 2) for these arguments."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        script.main(list(argv))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("reshard_experts.py: error: "), err
    return lines[0]


def test_reshard_script(tmp_path, capsys):
    script = reshard_script()
    full, base = write_run(tmp_path, 2)
    merged = str(tmp_path / "out" / "merged.pt")
    assert script.main([base, "-o", merged]) == 0
    assert_states_equal(load(merged), full)
    four = str(tmp_path / "four" / "checkpoint_last.pt")
    assert script.main([base, "--workers", "4", "-o", four]) == 0
    for rank in range(4):
        assert_states_equal(load(shard_path(four, rank)), select_expert_shard(full, plan(rank, 4)))
    assert sorted(os.listdir(tmp_path / "four")) == sorted(
        os.path.basename(shard_path(four, r)) for r in range(4))  # no temporary files left
    for path in (merged, shard_path(four, 3)):  # each carries the checksum of its own tensors
        state = load(path)
        assert CHECKSUM_KEY in state
        verify_and_strip(state, path)
    three = str(tmp_path / "three" / "checkpoint_last.pt")
    line = refused(script, capsys, base, "-n", "3", "-o", three)
    assert "cannot hold equal shares of the 8 experts" in line
    assert "not found" in refused(script, capsys, str(tmp_path / "nothing.pt"), "-o", three)
    assert "--workers must be >= 1" in refused(script, capsys, base, "-n", "0", "-o", three)
    assert not (tmp_path / "three").exists()  # checked before creating the output folder


def test_reshard_refuses_to_overwrite_without_force(tmp_path, capsys):
    script = reshard_script()
    full, base = write_run(tmp_path, 2)
    four = str(tmp_path / "four" / "checkpoint_last.pt")
    assert script.main([base, "-n", "4", "-o", four]) == 0
    before = {r: os.stat(shard_path(four, r)).st_mtime_ns for r in range(4)}
    line = refused(script, capsys, base, "-n", "4", "-o", four)
    assert f"{four} exists (and 3 more of the output files); choose another -o or add --force" in line
    os.remove(four)  # only a shard file of -o is in the way: still refused, naming it
    os.remove(shard_path(four, 1))
    line = refused(script, capsys, base, "-n", "4", "-o", four)
    assert f"{shard_path(four, 2)} exists (and 1 more" in line and "--force" in line
    assert {r: os.stat(shard_path(four, r)).st_mtime_ns for r in (2, 3)} == {2: before[2], 3: before[3]}
    assert script.main([base, "-n", "4", "-o", four, "--force"]) == 0
    for rank in range(4):
        assert_states_equal(load(shard_path(four, rank)), select_expert_shard(full, plan(rank, 4)))


def test_reshard_refuses_directories_inputs_and_shard_names_as_output(tmp_path, capsys):
    script = reshard_script()
    _, base = write_run(tmp_path, 2)
    line = refused(script, capsys, base, "-o", str(tmp_path))
    assert f"-o {tmp_path} is a directory; give a file name, e.g. {tmp_path}/checkpoint_last.pt" in line
    assert "would overwrite the input" in refused(script, capsys, base, "-n", "2", "-o", base, "--force")
    line = refused(script, capsys, base, "-o", shard_path(base, 1), "--force")
    assert "is a shard file name; give worker 0's name" in line
    link = tmp_path / "link.pt"  # another name of the input's shard file
    os.symlink(shard_path(base, 1), link)
    line = refused(script, capsys, base, "-o", str(link), "--force")
    assert f"-o would overwrite the input {shard_path(base, 1)} (even with --force)" in line
    (tmp_path / "file").write_text("x")
    line = refused(script, capsys, base, "-o", str(tmp_path / "file" / "sub" / "out.pt"))
    assert "cannot create the folder" in line and "is a file" in line


def test_reshard_missing_or_corrupt_inputs_write_nothing(tmp_path, capsys, monkeypatch):
    script = reshard_script()
    _, base = write_run(tmp_path, 2)
    out = tmp_path / "new" / "out.pt"
    shard = shard_path(base, 1)
    data = open(shard, "rb").read()
    with open(shard, "wb") as f:  # truncated: a copy that stopped half way
        f.write(data[:len(data) // 2])
    line = refused(script, capsys, base, "-o", str(out))
    assert f"cannot read {shard}" in line and "truncated or not a checkpoint" in line
    os.remove(shard)
    assert "checkpoint_last-expert-shard1.pt" in refused(script, capsys, base, "-o", str(out))
    assert not (tmp_path / "new").exists()
    with open(shard, "wb") as f:
        f.write(data)
    damaged = load(shard)  # readable, but a tensor differs from the checksum saved with it
    add_checksum(damaged)
    damaged["model"]["dec.moe.experts.biases.0"][0, 0] += 1
    torch.save(damaged, shard)
    line = refused(script, capsys, base, "-o", str(out))
    assert f"{shard} is damaged" in line and "dec.moe.experts.biases.0" in line
    with open(shard, "wb") as f:
        f.write(data)
    calls = []
    real_save = torch.save

    def failing_save(state, path):  # the disk fills up at the second file
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
        real_save(state, path)

    monkeypatch.setattr(torch, "save", failing_save)
    line = refused(script, capsys, base, "-n", "2", "-o", str(out))
    assert "cannot write" in line and "nothing was written" in line
    assert os.listdir(tmp_path / "new") == []  # no output, no temporary file


def test_reshard_cli_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "checkpoint_last.pt"
    bad.write_bytes(b"not a checkpoint at all")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "reshard_experts.py"),
                             str(bad), "-o", str(tmp_path / "out.pt")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"reshard_experts.py: error: cannot read {bad}" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("flags, named", [
    (dict(fp16=True), "--fp16-no-flatten-grads"),
    (dict(ddp_backend="fully_sharded"), "fully_sharded"),
    (dict(store_ema=True), "--store-ema"),
    (dict(use_bmuf=True), "--use-bmuf"),
])
def test_options_that_assume_identical_parameters_are_refused(flags, named):
    from argparse import Namespace

    from fairseq_smoe.models.parallel import check_expert_parallel_options as _check_training_options

    with pytest.raises(ValueError, match="--no-moe-expert-parallel") as error:
        _check_training_options(Namespace(**flags))
    assert named in str(error.value)
    _check_training_options(Namespace(fp16=True, fp16_no_flatten_grads=True))
    _check_training_options(Namespace(fp16=True, memory_efficient_fp16=True, ddp_backend="legacy_ddp"))
