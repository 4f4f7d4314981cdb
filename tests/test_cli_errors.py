"""Mistakes end a fairseq command with one clear line, from every worker and every launcher path.

* a plugin configuration error in a 2-worker run (scripts/launch_cpu.py) reaches the user
  (torch.distributed's excepthook buffers stderr; the line must not be lost in it), exit 2;
* an error of ours inside a child of fairseq's own launcher (torch.multiprocessing.spawn) is
  reported as its message, not the child's traceback;
* NaN/Inf gradients: fairseq's NanDetector runs over MoE modules (their outputs are tuples it
  can walk) and the command ends with one line that says what to change.
"""

import os
import subprocess
import sys

import pytest
import torch
from test_cli_distributed import BIN, MODEL, ROOT, corpus  # noqa: F401  (module fixture)

from fairseq_smoe.compat import cli_errors
from fairseq_smoe.modules import HierarchicalMoELayer, MoELayer

pytestmark = pytest.mark.slow


def fairseq_train(corpus, save_dir, *extra, workers=1, timeout=300):  # noqa: F811
    args = [os.path.join(BIN, "fairseq-train"), corpus, "--user-dir", "fairseq_smoe",
            "--save-dir", str(save_dir), *MODEL, "--optimizer", "adam", "--lr", "1e-3", *extra]
    if workers == 1:
        args.append("--cpu")
    else:
        args = [sys.executable, os.path.join(ROOT, "scripts", "launch_cpu.py"), "--workers",
                str(workers), "--"] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("extra, message", [
    (["--moe-num-experts", "3", "--moe-k", "1"], "2 workers cannot hold equal shares of the 3 experts"),
    (["--moe-num-experts", "12", "--moe-groups", "3", "--moe-k", "1"],
     "2 workers cannot hold equal numbers of whole groups"),
    (["--moe-k", "5"], "--moe-k 5 is larger than --moe-num-experts 4"),
    (["--store-ema"], "does not support --store-ema"),
])
def test_configuration_errors_reach_the_user_from_every_worker(corpus, tmp_path, extra, message):  # noqa: F811, E501
    result = fairseq_train(corpus, tmp_path, "--max-update", "1", *extra, workers=2)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    lines = [line for line in output.splitlines() if "fairseq-smoe: error:" in line]
    assert lines and all(message in line for line in lines), output[-3000:]
    assert "Traceback" not in output
    assert not (tmp_path / "checkpoint_last.pt").exists()


@pytest.mark.parametrize("flag", ["--fp16", "--memory-efficient-fp16", "--amp"])
def test_half_precision_training_on_cpu_is_one_line(corpus, tmp_path, flag):  # noqa: F811
    result = fairseq_train(corpus, tmp_path, "--max-update", "1", flag)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    lines = [line for line in output.splitlines() if "fairseq-smoe: error:" in line]
    assert len(lines) == 1 and "trains in half precision on a CUDA GPU" in lines[0], output[-3000:]
    assert f"drop {flag}" in lines[0] or f"and {flag} to train in fp32" in lines[0]
    assert "Traceback" not in output


@pytest.mark.parametrize("extra, message", [
    (["--update-freq", "0"], "--update-freq must be a positive integer (batches per update); got 0"),
    (["--adam-betas", "abc"], "--adam-betas must be two numbers in [0, 1), written like '(0.9, 0.98)'; "
                              "got 'abc'"),
    (["--max-tokens", "16"], "--max-tokens 16 is smaller than --tokens-per-sample 32: no batch can "
                             "hold one sample"),
])
def test_options_fairseq_would_fail_on_deep_inside_are_one_line(corpus, tmp_path, extra, message):  # noqa: F811
    result = fairseq_train(corpus, tmp_path, "--max-update", "1", *extra)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    lines = [line for line in output.splitlines() if "fairseq-smoe: error:" in line]
    assert len(lines) == 1 and message in lines[0], output[-3000:]
    assert "Traceback" not in output


def _damaged_copy(corpus, tmp_path, fault):  # noqa: F811
    import shutil

    import numpy as np

    folder = tmp_path / ("data:1" if fault == "colon" else "data")
    shutil.copytree(corpus, folder)
    if fault == "truncated":
        with open(folder / "train.bin", "r+b") as f:
            f.truncate(os.path.getsize(folder / "train.bin") // 2)
    elif fault == "dictionary":  # the data of a larger vocabulary: a token id past this dict
        lines = (folder / "dict.txt").read_text().splitlines()
        (folder / "dict.txt").write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    elif fault == "empty":
        from fairseq.data.indexed_dataset import MMapIndexedDataset

        index = MMapIndexedDataset.Index(str(folder / "train.idx"))
        dtype = index.dtype
        del index
        with MMapIndexedDataset.Index.writer(str(folder / "train.idx"), dtype) as writer:
            writer.write([])
        (folder / "train.bin").write_bytes(b"")
        assert np.dtype(dtype).itemsize > 0
    return folder


@pytest.mark.parametrize("fault, message", [
    ("truncated", "train.bin is truncated ("),
    ("dictionary", "but the dictionary has"),
    ("empty", "is empty (0 sentences)"),
    ("colon", "contains ':', which fairseq reads as a list of folders"),
])
def test_damaged_data_is_named_before_training(corpus, tmp_path, fault, message):  # noqa: F811
    folder = _damaged_copy(corpus, tmp_path, fault)
    result = fairseq_train(str(folder), tmp_path / "run", "--max-update", "1")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    lines = [line for line in output.splitlines() if "fairseq-smoe: error:" in line]
    assert len(lines) == 1 and message in lines[0], output[-3000:]
    assert "Traceback" not in output


def test_error_of_a_spawned_worker_is_reported_by_its_message():
    child = ('Traceback (most recent call last):\n'
             '  File "/x/site-packages/torch/multiprocessing/spawn.py", line 90, in _wrap\n'
             '    fn(i, *args)\n'
             f'  File "{os.path.join(os.path.dirname(cli_errors.__file__), "moe_args.py")}", '
             'line 7, in build\n'
             '    raise ValueError(msg)\n'
             'ValueError: --moe-k 5 is larger than --moe-num-experts 4; use --moe-k <= 4\n')
    assert cli_errors.child_error_message(child) == \
        "--moe-k 5 is larger than --moe-num-experts 4; use --moe-k <= 4"
    # Raised elsewhere (torch, fairseq) or another type: the traceback stays.
    assert cli_errors.child_error_message(child.replace(os.path.dirname(cli_errors.__file__), "/x")) is None
    assert cli_errors.child_error_message(child.replace("ValueError:", "KeyError:")) is None

    class ProcessRaisedException(Exception):
        error_index = 1

    message, status = cli_errors.one_line(ProcessRaisedException, ProcessRaisedException(child), None)
    assert status == 2 and message.startswith("fairseq-smoe: error (worker 1): --moe-k 5 is larger")


def test_sample_longer_than_max_tokens_names_the_options():
    error = AssertionError("Sentences lengths should not exceed max_tokens=256")
    message, status = cli_errors.one_line(AssertionError, error, None)
    assert status == 2 and "max_tokens=256" in message
    assert "--max-tokens" in message and "--tokens-per-sample" in message
    assert cli_errors.one_line(AssertionError, AssertionError("other"), None) is None


@pytest.mark.parametrize("layer", [
    MoELayer(8, 8, num_experts=4, hidden_dim=16, k=2),
    HierarchicalMoELayer(8, 8, num_groups=2, experts_per_group=2, hidden_dim=16, k_primary=1,
                         k_secondary=2),
])
def test_nan_detector_walks_moe_modules(layer, caplog):
    """fairseq re-runs a step with NaN/Inf gradients under NanDetector, whose backward hooks
    index every module's output with [0] until they reach a tensor."""
    from fairseq.nan_detector import NanDetector

    layer.train()
    x = torch.randn(6, 8, requires_grad=True)
    with NanDetector(layer):
        y, stats = layer(x)
        (y.sum() * float("inf") + stats.loss).backward()
    assert any("detected in output of" in r.getMessage() for r in caplog.records)


def test_diverged_training_ends_with_one_line_after_fairseqs_report(corpus, tmp_path):  # noqa: F811
    result = fairseq_train(corpus, tmp_path, "--optimizer", "sgd", "--lr", "1e6",
                           "--max-update", "40", "--disable-validation")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "fairseq.nan_detector" in output  # fairseq's own report of where it went NaN/Inf
    assert "Traceback" not in output and "not subscriptable" not in output
    last = output.strip().splitlines()[-1]
    assert last.startswith("fairseq-smoe: error: training diverged: gradients are Nan/Inf")
    assert "--lr" in last and "--clip-norm" in last and "--adam-eps above 0" in last


@pytest.fixture(scope="module")
def sharded_checkpoint(corpus, tmp_path_factory):  # noqa: F811
    save_dir = tmp_path_factory.mktemp("ep_eval")
    trained = fairseq_train(corpus, save_dir, "--max-update", "2", "--no-epoch-checkpoints",
                            "--disable-validation", workers=2)
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-3000:]
    assert (save_dir / "checkpoint_last-expert-shard1.pt").exists()
    return save_dir / "checkpoint_last.pt"


@pytest.mark.parametrize("tool", ["fairseq-eval-lm", "fairseq-validate"])
def test_distributed_evaluation_is_refused_at_start(corpus, sharded_checkpoint, tool):  # noqa: F811
    """Under W workers fairseq-eval-lm would report worker 0's share of the test set (and
    sharded experts could hang on uneven batches): every worker refuses before any exchange."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "launch_cpu.py"), "--workers", "2", "--",
         os.path.join(BIN, tool), corpus, "--user-dir", "fairseq_smoe", "--task", "language_modeling",
         "--path", str(sharded_checkpoint), "--max-tokens", "256", "--num-workers", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert f"{tool} of fairseq-smoe models runs in one process (this run has 2 workers)" in output
    assert "Traceback" not in output and "Evaluated" not in output and "valid on" not in output
