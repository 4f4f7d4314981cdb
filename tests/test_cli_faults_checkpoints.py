"""Fault injection for checkpoints: a kill during a save, damaged files, a typo'd --restore-file.

* A process SIGKILLed while it writes or copies a checkpoint leaves the previous file intact
  (fairseq's own copy, as a control, leaves it truncated).
* A flipped byte in the tensors (model or optimizer state) is caught by the checksum saved with
  the file; a truncated file is one clear error naming it; files without a checksum still load.
* Through the CLIs (tiny LM): fairseq-eval-lm on a damaged file and a fairseq-train resume from
  a truncated checkpoint_last.pt end with one line naming the file, and a typo'd --restore-file
  stops before anything is written.
* Two workers, one SIGKILLed while it writes its shard of a save: the resume stops on every
  worker with the newest checkpoint whose two files agree, and resuming from it works.
"""

import os
import re
import signal
import subprocess
import sys
import time
import zlib
from collections import OrderedDict

import pytest
import torch
from conftest import ROOT
from test_cli_lm import BIN, corpus, train  # noqa: F401  (corpus: the tiny LM fixture)
from test_module_expert_checkpoints import full_state, plan

from fairseq_smoe.checkpoint_files import CHECKSUM_KEY
from fairseq_smoe.compat import checkpoint_safety
from fairseq_smoe.distributed.checkpoints import (
    last_consistent_checkpoint,
    load_for_this_process,
    select_expert_shard,
    shard_path,
)
from fairseq_smoe.plugin import install

install()  # the plugin, as --user-dir does: registers it with fairseq, installs its patches

ARCH = "lstm_moe_lm_tiny"


def fairseq_state(seed=0):
    """A small checkpoint as fairseq's trainer writes it (model, optimizer history, iterator)."""
    g = torch.Generator().manual_seed(seed)
    model = OrderedDict([("decoder.embed.weight", torch.randn(7, 5, generator=g)),
                         ("decoder.moe.experts.weights.0", torch.randn(4, 5, 6, generator=g)),
                         ("decoder.half", torch.randn(3, 4, generator=g).to(torch.bfloat16)),
                         ("decoder.scalar", torch.tensor(3.0)),
                         ("decoder.empty", torch.zeros(0))])
    optimizer = {"state": {0: {"step": 3, "exp_avg": torch.randn(7, 5, generator=g)}},
                 "param_groups": [{"params": [0]}]}
    return {"args": None, "cfg": None, "model": model, "last_optimizer_state": optimizer,
            "optimizer_history": [{"num_updates": 3, "optimizer_name": "FairseqAdam",
                                   "criterion_name": "X", "lr_scheduler_state": {}}],
            "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 3}}}


def load(path):
    from fairseq import checkpoint_utils

    return checkpoint_utils.load_checkpoint_to_cpu(str(path))


def flip_a_byte(path, tensor):
    """Flip one bit in the middle of ``tensor``'s bytes inside checkpoint file ``path``."""
    data = bytearray(open(path, "rb").read())
    raw = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    at = data.find(raw)
    assert at > 0 and data.find(raw, at + 1) < 0, "tensor bytes not found once in the file"
    data[at + len(raw) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))


# ---------------------------------------------------------------------------------------------
# Kill during a write (a forked child SIGKILLs itself half-way through)


def die_half_way(write_half):
    """In a forked child: run ``write_half()`` and SIGKILL the child at once. Returns the
    child's wait status (the parent continues)."""
    pid = os.fork()
    if pid == 0:  # child
        try:
            write_half()
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return status


def _dying_copy(src, dst, *args, **kwargs):
    """shutil.copyfile/copyfileobj that writes half of the source and then dies."""
    if isinstance(src, (str, bytes, os.PathLike)):
        data = open(src, "rb").read()
        out = open(dst, "wb")
    else:
        data, out = src.read(), dst
    out.write(data[:len(data) // 2])
    out.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def test_kill_during_copy_or_save_leaves_the_old_file(tmp_path, monkeypatch):
    import shutil

    from fairseq import checkpoint_utils
    from fairseq.file_io import PathManager

    new, last = tmp_path / "checkpoint_1_6.pt", tmp_path / "checkpoint_last.pt"
    torch.save(fairseq_state(1), new)
    torch.save(fairseq_state(0), last)
    old_bytes = last.read_bytes()

    def copy_with(copy):
        def run():
            shutil.copyfile = shutil.copyfileobj = _dying_copy  # only in the child
            copy(str(new), str(last), overwrite=True)
        return run

    # Control: fairseq's PathManager.copy writes onto the target: truncated by the kill.
    status = die_half_way(copy_with(PathManager.copy))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert 0 < last.stat().st_size < len(old_bytes)
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*checkpoint_last\.pt: the file "
                                         r"is truncated or damaged .*checkpoint_1_6\.pt"):
        load(last)

    # The plugin's copy (what save_checkpoint calls): the old file stays whole.
    last.write_bytes(old_bytes)
    status = die_half_way(copy_with(checkpoint_utils.PathManager.copy))
    assert os.WIFSIGNALED(status)
    assert last.read_bytes() == old_bytes
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == 1 and leftovers[0].startswith("checkpoint_last.pt.tmp-")

    # Killed during the trainer's write of the first file (torch_persistent_save).
    def dying_save(obj, f, *args, **kwargs):
        f.write(b"\0" * 1000)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    newer = fairseq_state(2)

    def save():
        torch.save = dying_save  # only in the child
        checkpoint_utils.torch_persistent_save(newer, str(last))

    status = die_half_way(save)
    assert os.WIFSIGNALED(status) and last.read_bytes() == old_bytes
    torch.testing.assert_close(load(last)["model"]["decoder.embed.weight"],
                               fairseq_state(0)["model"]["decoder.embed.weight"], rtol=0, atol=0)

    # The next complete save replaces the file and removes the dead writers' temp files.
    checkpoint_utils.PathManager.copy(str(new), str(last), overwrite=True)
    assert last.read_bytes() == new.read_bytes()
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]


# ---------------------------------------------------------------------------------------------
# Checksums and damaged files


def test_checksum_catches_a_flipped_byte(tmp_path, monkeypatch):
    from fairseq import checkpoint_utils

    path = tmp_path / "checkpoint_1_3.pt"
    state = fairseq_state()
    checkpoint_utils.torch_persistent_save(state, str(path))
    raw = torch.load(path, weights_only=False)
    record = raw[CHECKSUM_KEY]
    assert record["algorithm"] == "crc32"
    assert set(record["tensors"]) == {f"model.{k}" for k in state["model"]} | {
        "last_optimizer_state.state.0.exp_avg"}
    expected = zlib.crc32(state["model"]["decoder.embed.weight"].numpy().tobytes())
    assert record["tensors"]["model.decoder.embed.weight"] == expected

    intact = load(path)
    assert CHECKSUM_KEY not in intact  # verified, then dropped: never carried into other files
    torch.save(intact, tmp_path / "checkpoint_1_6.pt")  # newer numbered file, for the hint

    flip_a_byte(path, state["model"]["decoder.moe.experts.weights.0"])
    with pytest.raises(ValueError) as error:
        load(path)
    message = str(error.value)
    assert "checkpoint_1_3.pt is damaged: 1 of its 6 tensors differ from the checksum" in message
    assert "(model.decoder.moe.experts.weights.0)" in message
    assert f"--restore-file {tmp_path / 'checkpoint_1_6.pt'}" in message
    assert "\n" not in message

    # The optimizer's moments are covered too (a resume would silently train differently).
    other = tmp_path / "checkpoint_1_4.pt"
    checkpoint_utils.torch_persistent_save(fairseq_state(), str(other))
    flip_a_byte(other, state["last_optimizer_state"]["state"][0]["exp_avg"])
    with pytest.raises(ValueError, match=r"1 of its 6 tensors .*\(last_optimizer_state\.state\.0\."
                                         r"exp_avg\)"):
        load(other)

    monkeypatch.setenv("SMOE_CHECKPOINT_CHECKSUM", "0")  # the documented way to load it unchecked
    unchecked = load(path)["model"]["decoder.moe.experts.weights.0"]
    assert not torch.equal(unchecked, state["model"]["decoder.moe.experts.weights.0"])


def test_file_without_checksum_loads_as_before(tmp_path, caplog):
    path = tmp_path / "old.pt"
    torch.save(fairseq_state(), path)  # as fairseq without the plugin (or another tool) wrote it
    with caplog.at_level("INFO", logger="fairseq_smoe.checkpoint_files"):
        got = load(path)
    torch.testing.assert_close(got["model"]["decoder.half"], fairseq_state()["model"]["decoder.half"],
                               rtol=0, atol=0)
    assert any("no checksum" in r.getMessage() and "old.pt" in r.getMessage()
               for r in caplog.records)


def test_truncated_file_is_one_clear_error(tmp_path):
    path = tmp_path / "checkpoint_last.pt"
    torch.save(fairseq_state(), path)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(ValueError) as error:
        load(path)
    message = str(error.value)
    assert message.startswith(f"cannot read checkpoint {path}: the file is truncated or damaged")
    assert "Restore it from a copy or use another checkpoint." in message and "\n" not in message


def test_restore_file_check(tmp_path, monkeypatch):
    from argparse import Namespace

    def cfg(restore, save_dir="run", finetune=None):
        return Namespace(restore_file=restore, save_dir=save_dir, finetune_from_model=finetune,
                         continue_once=None)

    monkeypatch.chdir(tmp_path)
    os.makedirs("run")
    for name in ("checkpoint_last.pt", "checkpoint_1_3.pt", "checkpoint_best.pt"):
        open(os.path.join("run", name), "wb").close()
    exists = os.path.isfile
    check = checkpoint_safety.check_restore_file
    check(cfg("checkpoint_last.pt", "new"), "", exists)  # default, absent: fresh start
    check(cfg("new/checkpoint_last.pt", "new"), "", exists)  # the same file, spelled out
    check(cfg("run/checkpoint_1_3.pt"), "-expert-shard1", exists)  # worker 1 reads the base name
    with pytest.raises(ValueError, match=r"--restore-file run/checkpont_1_3\.pt: no such file "
                                         r"\(.*\); nothing was loaded or written"):
        check(cfg("run/checkpont_1_3.pt"), "", exists)
    with pytest.raises(ValueError, match=r"--restore-file run/checkpoint_9_9\.pt: .*run holds "
                                         r"checkpoint_last\.pt, checkpoint_best\.pt, "
                                         r"checkpoint_1_3\.pt\)"):
        check(cfg("run/checkpoint_9_9.pt"), "-expert-shard1", exists)
    with pytest.raises(ValueError, match=r"did you mean run/checkpoint_1_3\.pt\?"):
        check(cfg("checkpoint_1_3.pt"), "", exists)  # relative names are read from the cwd
    with pytest.raises(ValueError, match="--finetune-from-model base.pt: no such file"):
        check(cfg("checkpoint_last.pt", "new", finetune="base.pt"), "", exists)


# ---------------------------------------------------------------------------------------------
# Shards of one checkpoint from different saves


def test_disagreeing_shards_name_the_last_consistent_checkpoint(tmp_path):
    """Worker 1 died during the save at update 6: worker 0's checkpoint_2_6.pt and
    checkpoint_last.pt are at 6, worker 1's newest files are from the end of epoch 1."""
    def save_at(name, updates, ranks):
        full = full_state()
        full["optimizer_history"] = [{"num_updates": updates}]
        full["extra_state"]["train_iterator"]["iterations_in_epoch"] = updates
        for rank in ranks:
            torch.save(select_expert_shard(full, plan(rank, 2)),
                       shard_path(str(tmp_path / name), rank))

    save_at("checkpoint_1_3.pt", 3, [0, 1])
    save_at("checkpoint1.pt", 5, [0, 1])  # end of epoch 1: newer than checkpoint_1_3
    save_at("checkpoint_2_6.pt", 6, [0])
    save_at("checkpoint_last.pt", 6, [0])
    save_at("checkpoint_last.pt", 5, [1])
    good = str(tmp_path / "checkpoint1.pt")
    assert last_consistent_checkpoint(str(tmp_path), 2) == good

    def read(path):
        return torch.load(path, weights_only=False)

    for target in (plan(0, 2), plan(1, 2), None):  # both workers, and a merge in one process
        with pytest.raises(ValueError, match="come from different saves") as error:
            load_for_this_process(str(tmp_path / "checkpoint_last.pt"), read, target)
        assert (f"The newest checkpoint whose 2 files all agree is {good}: resume from it with "
                f"--restore-file {good}") in str(error.value)
    with pytest.raises(FileNotFoundError, match=f"--restore-file {good}"):
        load_for_this_process(str(tmp_path / "checkpoint_2_6.pt"), read, plan(1, 2))
    assert load_for_this_process(good, read, plan(1, 2))["optimizer_history"][-1]["num_updates"] == 5


# ---------------------------------------------------------------------------------------------
# Through the command-line tools


pytest_slow = pytest.mark.slow


def run(tool, *args, timeout=240, env=None):
    """A fairseq command (or Python script); (exit status, stdout + stderr). Never hangs."""
    program = [os.path.join(BIN, tool)] if not tool.endswith(".py") else [sys.executable, tool]
    result = subprocess.run(program + [str(a) for a in args], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout,
                            env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    return result.returncode, result.stdout + result.stderr


def error_lines(output):
    return [line for line in output.splitlines() if "fairseq-smoe: error:" in line]


def snapshot(folder):
    """The files of a save directory, the run's lock (rewritten by each run that starts) aside."""
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()
            if p.name != ".smoe-train.lock"}


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):  # noqa: F811
    root, _ = corpus
    save_dir = tmp_path_factory.mktemp("faults_run")
    train(root / "bin", save_dir, ARCH, 6, "--save-interval-updates", 3)
    return root / "bin", save_dir


def copy_run(trained, tmp_path):
    import shutil

    data, save_dir = trained
    target = tmp_path / "run"
    shutil.copytree(save_dir, target)
    return data, target


TRAIN_ARGS = ["--user-dir", "fairseq_smoe", "--task", "language_modeling", "--arch", ARCH,
              "--criterion", "smoe_cross_entropy", "--optimizer", "adam", "--lr", "0.01",
              "--tokens-per-sample", "32", "--sample-break-mode", "none", "--max-tokens", "512",
              "--cpu", "--num-workers", "0", "--seed", "1", "--log-format", "simple",
              "--no-epoch-checkpoints", "--max-update", "9"]


@pytest_slow
def test_saved_files_carry_a_checksum(trained):
    _, save_dir = trained
    names = sorted(p.name for p in save_dir.iterdir() if p.name != ".smoe-train.lock")
    assert names == ["checkpoint_1_3.pt", "checkpoint_1_6.pt", "checkpoint_best.pt",
                     "checkpoint_last.pt"]  # no temp file left behind
    for name in names:
        raw = torch.load(save_dir / name, weights_only=False)
        covered = set(raw[CHECKSUM_KEY]["tensors"])
        assert {f"model.{k}" for k in raw["model"]} <= covered
        assert any(n.startswith("last_optimizer_state.state.") for n in covered)


@pytest_slow
def test_eval_lm_on_a_flipped_byte_says_which_file(trained, tmp_path):
    data, run_dir = copy_run(trained, tmp_path)
    path = run_dir / "checkpoint_last.pt"
    raw = torch.load(path, weights_only=False)
    model, count = raw["model"], len(raw[CHECKSUM_KEY]["tensors"])
    storages = [t.untyped_storage().data_ptr() for t in model.values()]
    key = max((k for k in model if storages.count(model[k].untyped_storage().data_ptr()) == 1),
              key=lambda k: model[k].numel())  # the largest tensor that shares no storage
    flip_a_byte(path, model[key])
    status, output = run("fairseq-eval-lm", data, "--user-dir", "fairseq_smoe", "--path", path,
                         "--gen-subset", "test", "--tokens-per-sample", 32, "--max-tokens", 1024,
                         "--cpu")
    assert status == 2, output[-3000:]
    assert error_lines(output) == [
        f"fairseq-smoe: error: {path} is damaged: 1 of its {count} tensors differ from the "
        f"checksum saved with them (model.{key}). Restore it from a copy or use another checkpoint, e.g. "
        f"{run_dir / 'checkpoint_1_6.pt'} (fairseq-train --restore-file "
        f"{run_dir / 'checkpoint_1_6.pt'}, or --path {run_dir / 'checkpoint_1_6.pt'})."]
    assert "Traceback" not in output and "Perplexity" not in output


@pytest_slow
def test_resume_from_truncated_checkpoint_last_says_which_file(trained, tmp_path):
    data, run_dir = copy_run(trained, tmp_path)
    path = run_dir / "checkpoint_last.pt"
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    before = snapshot(run_dir)
    status, output = run("fairseq-train", data, "--save-dir", run_dir, *TRAIN_ARGS)
    assert status == 2, output[-3000:]
    lines = error_lines(output)
    assert len(lines) == 1 and "Traceback" not in output, output[-3000:]
    assert lines[0].startswith(f"fairseq-smoe: error: cannot read checkpoint {path}: the file is "
                               f"truncated or damaged (RuntimeError: PytorchStreamReader failed")
    assert f"--restore-file {run_dir / 'checkpoint_1_6.pt'}" in lines[0]
    assert snapshot(run_dir) == before


@pytest_slow
def test_typo_in_restore_file_stops_before_writing(trained, tmp_path):
    data, run_dir = copy_run(trained, tmp_path)
    before = snapshot(run_dir)
    typo = run_dir / "checkpont_1_3.pt"
    status, output = run("fairseq-train", data, "--save-dir", run_dir, "--restore-file", typo,
                         *TRAIN_ARGS)
    assert status == 2, output[-3000:]
    assert error_lines(output) == [
        f"fairseq-smoe: error: --restore-file {typo}: no such file ({typo}); nothing was loaded "
        f"or written. Give an existing checkpoint ({run_dir} holds checkpoint_last.pt, "
        f"checkpoint_best.pt, checkpoint_1_6.pt, checkpoint_1_3.pt), or leave --restore-file out "
        f"to resume from {run_dir / 'checkpoint_last.pt'} (a fresh start when there is none)."]
    assert "Traceback" not in output and "num_updates" not in output
    assert snapshot(run_dir) == before


HOLD_LOCK = """
import sys, time
from fairseq_smoe.compat.save_dir_lock import lock_save_dir
lock_save_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def hold_lock(save_dir):
    """A separate process that takes the save-dir lock and keeps it until killed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(save_dir)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_save_dir_lock_refuses_a_second_process_and_ends_with_its_holder(tmp_path):
    from fairseq_smoe.compat.save_dir_lock import lock_save_dir, release_all

    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(ValueError, match=rf"in use by another training \(pid {holder.pid} on "):
            lock_save_dir(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    try:  # the holder is gone: its leftover file does not block
        assert lock_save_dir(str(tmp_path)) == str(tmp_path / ".smoe-train.lock")
        assert f"pid {os.getpid()} " in (tmp_path / ".smoe-train.lock").read_text()
    finally:
        release_all()


@pytest_slow
def test_second_training_on_one_save_dir_stops_before_writing(trained, tmp_path):
    data, run_dir = copy_run(trained, tmp_path)
    holder = hold_lock(run_dir)
    try:
        before = snapshot(run_dir)
        status, output = run("fairseq-train", data, "--save-dir", run_dir, *TRAIN_ARGS)
    finally:
        holder.kill()
        holder.wait()
    assert status == 2, output[-3000:]
    lines = error_lines(output)
    assert len(lines) == 1 and f"--save-dir {run_dir} is in use by another training (pid " \
        f"{holder.pid} on " in lines[0] and "give this run its own --save-dir" in lines[0]
    assert "Traceback" not in output and "num_updates" not in output
    assert snapshot(run_dir) == before
    status, output = run("fairseq-train", data, "--save-dir", run_dir, *TRAIN_ARGS)  # free again
    assert status == 0, output[-3000:]


@pytest_slow
def test_resume_with_other_max_tokens_continues_after_the_same_tokens(corpus, tmp_path):  # noqa: F811
    """Saved after 3 batches of 256 tokens; resumed with --max-tokens 1024, the epoch continues
    at batch 1 (768 tokens done), not at batch 3 (which would skip 2,304 tokens), and says so."""
    root, _ = corpus
    train(root / "bin", tmp_path, ARCH, 3, "--max-tokens", 256)
    output = train(root / "bin", tmp_path, ARCH, 4, "--max-tokens", 1024)
    assert ("resuming with other batches (--max-tokens 256 -> 1024): the epoch continues at batch 1 "
            "instead of 3, after about the same 768 tokens") in output


@pytest_slow
def test_configuration_that_lost_an_moe_option_is_mended_or_named(corpus, tmp_path):  # noqa: F811
    """A model trained with --moe-k 1 whose saved configuration lost moe_k: the options recorded
    beside it put k = 1 back (same perplexity as the intact file); a file without the record
    loads with the architecture's k = 2 and says so, naming --model-overrides."""
    root, _ = corpus
    train(root / "bin", tmp_path, ARCH, 3, "--moe-k", 1)
    path = tmp_path / "checkpoint_last.pt"

    def perplexity(checkpoint):
        status, output = run("fairseq-eval-lm", root / "bin", "--user-dir", "fairseq_smoe", "--path",
                             checkpoint, "--cpu", "--tokens-per-sample", 32, "--max-tokens", 512)
        assert status == 0, output[-3000:]
        return float(re.findall(r"Perplexity: ([\d.]+)", output)[-1]), output

    intact, _ = perplexity(path)
    state = torch.load(path, weights_only=False)
    assert state["smoe_moe_options"]["moe_k"] == 1
    del state["cfg"]["model"].moe_k
    del state["args"]
    torch.save(state, tmp_path / "lost_k.pt")
    mended, output = perplexity(tmp_path / "lost_k.pt")
    assert mended == intact and "restored from the options recorded in the checkpoint (moe_k=1)" in output
    del state["smoe_moe_options"]
    torch.save(state, tmp_path / "lost_k_no_record.pt")
    _, output = perplexity(tmp_path / "lost_k_no_record.pt")
    assert "lacks moe_k and the checkpoint records no value" in output and "(moe_k=2)" in output
    assert "--model-overrides" in output


@pytest_slow
@pytest.mark.parametrize("override, allowed", [("{'moe_num_experts': 8}", False),
                                               ("{'moe_gating': 'top_k'}", False),
                                               ("{'moe_hidden_dim': 48}", True),  # as trained
                                               ("{'moe_k': 1}", True)])
def test_model_overrides_of_the_parameters_shape_are_one_line(trained, override, allowed):
    data, run_dir = trained
    status, output = run("fairseq-eval-lm", data, "--user-dir", "fairseq_smoe", "--path",
                         run_dir / "checkpoint_last.pt", "--cpu", "--tokens-per-sample", 32,
                         "--max-tokens", 512, "--model-overrides", override)
    if allowed:
        assert status == 0 and "Perplexity" in output, output[-3000:]
        return
    assert status == 2, output[-3000:]
    lines = error_lines(output)
    assert len(lines) == 1 and "--model-overrides cannot change moe_" in lines[0]
    assert "can be overridden at inference: moe_k" in lines[0] and "Traceback" not in output


# A fairseq-train worker that dies (SIGKILL) half-way through writing the file named by
# $FAULT_KILL_WRITING, after waiting until worker 0 has written all files of that save (so the
# outcome does not depend on timing).
DYING_WORKER = """
import os, signal, sys, time
sys.argv[0] = "fairseq-train"
save_dir = sys.argv[sys.argv.index("--save-dir") + 1]
victim = os.environ["FAULT_KILL_WRITING"]
import torch
real_save = torch.save
def save(obj, f, *args, **kwargs):
    if os.path.basename(getattr(f, "name", "")).startswith(victim + ".tmp-"):
        done = os.path.join(save_dir, os.environ["FAULT_WAIT_FOR"])
        last = os.path.join(save_dir, "checkpoint_last.pt")
        deadline = time.time() + 120
        while time.time() < deadline and not (
                os.path.exists(done) and os.stat(last).st_mtime_ns >= os.stat(done).st_mtime_ns):
            time.sleep(0.05)
        f.write(b"\\0" * 4096)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
from fairseq_cli.train import cli_main
cli_main()
"""


@pytest_slow
def test_worker_killed_during_a_save_resume_names_the_last_consistent_checkpoint(corpus, tmp_path):  # noqa: F811
    root, _ = corpus
    data, save_dir = root / "bin", tmp_path / "ep"
    worker = tmp_path / "dying_worker.py"
    worker.write_text(DYING_WORKER)
    launcher = os.path.join(ROOT, "scripts", "launch_cpu.py")
    # (no validation: the tiny validation set does not split into equal batches per worker)
    args = [data, "--save-dir", save_dir, *TRAIN_ARGS[:-2], "--save-interval-updates", 3,
            "--disable-validation", "--max-update"]
    args.remove("--cpu")  # the launcher adds it
    status, output = run(launcher, "--workers", 2, "--", sys.executable, worker, *args, 6,
                         env={"FAULT_KILL_WRITING": "checkpoint_1_6-expert-shard1.pt",
                              "FAULT_WAIT_FOR": "checkpoint_1_6.pt"}, timeout=300)
    assert status != 0 and "Saved checkpoint" in output, output[-3000:]
    names = {p.name for p in save_dir.iterdir() if ".tmp-" not in p.name}
    assert {"checkpoint_1_6.pt", "checkpoint_last-expert-shard1.pt"} <= names
    assert "checkpoint_1_6-expert-shard1.pt" not in names  # never appeared half-written

    # The plain resume stops on both workers, naming the newest checkpoint whose files agree.
    start = time.monotonic()
    status, output = run(launcher, "--workers", 2, "--", os.path.join(BIN, "fairseq-train"),
                         *args, 9, timeout=300)
    good = save_dir / "checkpoint_1_3.pt"
    hint = (f"The newest checkpoint whose 2 files all agree is {good}: resume from it with "
            f"--restore-file {good}")
    lines = error_lines(output)
    assert status != 0 and len(lines) >= 1 and all(hint in line for line in lines), output[-3000:]
    assert "different saves" in lines[0] and "Traceback" not in output
    assert time.monotonic() - start < 120

    # Following the advice resumes from update 3 on the same two workers.
    status, output = run(launcher, "--workers", 2, "--", os.path.join(BIN, "fairseq-train"),
                         *args, 4, "--restore-file", good, timeout=300)
    assert status == 0, output[-3000:]
    assert "checkpoint_1_3.pt (epoch 1 @ 3 updates)" in output and "num_updates 4" in output


# ---------------------------------------------------------------------------------------------
# A checkpoint from before the hierarchical layer stacked its secondary gates' weights


def as_old_hierarchical_checkpoint(path):
    """Rewrite ``path`` as the older fairseq-smoe wrote it: one parameter per secondary gate
    ("secondary_gates.{i}.w_gate", ...), so Adam's state had that many more parameters."""
    raw = torch.load(path, weights_only=False)
    raw.pop(CHECKSUM_KEY)
    model, extra = OrderedDict(), 0
    for key, tensor in raw["model"].items():
        head, _, name = key.rpartition(".")
        if head.endswith("secondary_gates") and name in ("w_gate", "w_noise", "log_thresholds"):
            for i in range(tensor.shape[0]):
                model[f"{head}.{i}.{name}"] = tensor[i].clone()
            extra += tensor.shape[0] - 1
        else:
            model[key] = tensor
    assert extra > 0
    raw["model"] = model
    group = raw["last_optimizer_state"]["param_groups"][0]
    group["params"] = list(range(len(group["params"]) + extra))
    torch.save(raw, path)


@pytest_slow
def test_old_hierarchical_checkpoint_loads_and_resume_names_reset_optimizer(corpus, tmp_path):  # noqa: F811
    """The model converts on load (fairseq-eval-lm works on the old file); a resume stops with
    one line naming --reset-optimizer (Adam's moments cannot convert), and with it goes on."""
    import shutil

    root, _ = corpus
    run_dir = tmp_path / "run"
    hierarchical = [*TRAIN_ARGS[:4], "--arch", "lstm_moe_lm_tiny_h", *TRAIN_ARGS[6:]]
    status, output = run("fairseq-train", root / "bin", "--save-dir", run_dir, *hierarchical[:-1], 3)
    assert status == 0, output[-3000:]
    assert any(k.endswith("secondary_gates.w_gate") for k in load(run_dir / "checkpoint_last.pt")["model"])
    old = tmp_path / "old.pt"
    shutil.copy(run_dir / "checkpoint_last.pt", old)
    as_old_hierarchical_checkpoint(old)
    assert any(k.endswith("secondary_gates.0.w_gate") for k in load(old)["model"])
    status, output = run("fairseq-eval-lm", root / "bin", "--user-dir", "fairseq_smoe", "--path", old,
                         "--gen-subset", "test", "--tokens-per-sample", 32, "--max-tokens", 1024, "--cpu")
    assert status == 0 and "Perplexity" in output, output[-3000:]

    status, output = run("fairseq-train", root / "bin", "--save-dir", run_dir, "--restore-file", old,
                         *hierarchical)
    assert status == 2, output[-3000:]
    lines = error_lines(output)
    assert len(lines) == 1 and "Traceback" not in output, output[-3000:]
    assert "--reset-optimizer" in lines[0] and "secondary gate" in lines[0]
    status, output = run("fairseq-train", root / "bin", "--save-dir", run_dir, "--restore-file", old,
                         "--reset-optimizer", *hierarchical)
    assert status == 0 and "done training" in output, output[-3000:]


def test_optimizer_state_of_a_converted_model_is_refused_without_reset():
    """fairseq's fp16 optimizer flattens all parameters into one, so torch cannot see that an
    old hierarchical checkpoint's moments fit other parameters: the converted layer's flag does."""
    from types import SimpleNamespace

    from fairseq_smoe.modules import HierarchicalMoELayer

    layer = HierarchicalMoELayer(8, 8, 2, 4, 16)
    old = {k: v for k, v in layer.state_dict().items() if not k.startswith("secondary_gates.")}
    for name in ("w_gate", "w_noise"):
        for i in range(2):
            old[f"secondary_gates.{i}.{name}"] = getattr(layer.secondary_gates, name)[i].detach().clone()
    checkpoint_safety.check_optimizer_state_fits(SimpleNamespace(reset_optimizer=False), layer)
    layer.load_state_dict(old)
    with pytest.raises(ValueError, match="--reset-optimizer"):
        checkpoint_safety.check_optimizer_state_fits(SimpleNamespace(reset_optimizer=False), layer)
    checkpoint_safety.check_optimizer_state_fits(SimpleNamespace(reset_optimizer=True), layer)


def test_a_save_folder_that_refuses_writes_or_room_is_one_line(tmp_path, monkeypatch):
    """Read-only or full --save-dir (and --tensorboard-logdir) before training; a save that
    meets a full disk names the folder and its free space, and leaves the previous file whole.
    (Faked here: the machine running the tests as root writes anywhere.)"""
    import errno
    import shutil
    from collections import namedtuple

    from fairseq_smoe.checkpoint_files import atomic_write, check_save_dir, check_writable_dir

    real_open = open

    def read_only(path, *args, **kwargs):
        if ".smoe-write-test-" in str(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    with pytest.raises(ValueError, match=r"--tensorboard-logdir .*: cannot write there \(Read-only file"):
        check_writable_dir(str(tmp_path / "tb"), "--tensorboard-logdir")
    monkeypatch.setattr("builtins.open", real_open)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(ValueError, match=r"has 0.00 GiB free, and one checkpoint of this model needs "
                                         r"about 1.00 GiB"):
        check_save_dir(str(tmp_path), 1 << 30)
    check_save_dir(str(tmp_path), 1 << 10)  # room enough
    target = tmp_path / "checkpoint_last.pt"
    target.write_bytes(b"previous save")

    def fill_disk(f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: "
                           "file write failed")

    with pytest.raises(ValueError, match=r"cannot write in .* \(No space left on device; 0.00 GiB free "
                                         r"there\): checkpoint_last.pt was not written"):
        atomic_write(str(target), fill_disk)
    assert target.read_bytes() == b"previous save"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_last.pt", "tb"]  # no partial file left
