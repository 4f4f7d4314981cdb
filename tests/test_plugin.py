"""The plugin imports cleanly in every fairseq CLI and makes fairseq checkpoints loadable under
torch >= 2.6 without environment variables."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

BIN = os.path.dirname(sys.executable)
USER_DIR = os.path.join(ROOT, "fairseq_smoe")


def clean_env():
    env = dict(os.environ)
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    env.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
    return env


@pytest.mark.parametrize("cli", ["fairseq-train", "fairseq-generate", "fairseq-eval-lm",
                                 "fairseq-interactive"])
def test_user_dir_imports_in_every_cli(cli, tmp_path):
    result = subprocess.run([os.path.join(BIN, cli), "--user-dir", USER_DIR, "--help"],
                            capture_output=True, text=True, env=clean_env(), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "smoe_cross_entropy" in result.stdout  # our criteria are registered
    assert "Traceback" not in result.stderr


def test_trusted_checkpoint_loading_is_limited_to_fairseq_checkpoint_utils(tmp_path):
    from fairseq import checkpoint_utils
    from omegaconf import OmegaConf

    from fairseq_smoe.compat import install_all

    install_all()  # registers the plugin with fairseq, installs its patches

    path = str(tmp_path / "checkpoint.pt")
    state = {
        "args": None,
        "cfg": OmegaConf.create({"model": {"arch": "x"}}),
        "model": {"w": torch.ones(2)},
        "optimizer_history": [{"criterion_name": "SMoECrossEntropyCriterion",
                               "optimizer_name": "Adam", "lr_scheduler_state": {"best": 1.0},
                               "num_updates": 3}],
        "extra_state": {"epoch": 1},
    }
    torch.save(state, path)
    # torch's safe default still refuses the pickled config everywhere else...
    with pytest.raises(Exception, match="weights_only"):
        torch.load(path)
    # ...while fairseq's loader, which reads the checkpoints users name, loads it.
    loaded = checkpoint_utils.load_checkpoint_to_cpu(path)
    assert loaded["model"]["w"].tolist() == [1.0, 1.0]
    assert loaded["cfg"].model.arch == "x"


def test_last_partial_batch_is_kept():
    import numpy as np
    from fairseq.data import data_utils

    from fairseq_smoe.compat import install_all

    install_all()  # registers the plugin with fairseq, installs its patches

    indices = np.arange(100)
    sizes = np.full(100, 10)
    for max_tokens, max_sentences in [(4000, None), (None, 32), (None, 128)]:
        batches = data_utils.batch_by_size(indices, lambda i: sizes[i], max_tokens=max_tokens,
                                           max_sentences=max_sentences, required_batch_size_multiple=8)
        assert sorted(np.concatenate(batches).tolist()) == list(range(100))
        assert all(len(b) % 8 == 0 for b in batches[:-1])  # the multiple still holds elsewhere


@pytest.mark.parametrize("extra, message", [
    (["--moe-num-experts", "4", "--moe-k", "5"], "--moe-k 5 is larger than --moe-num-experts 4"),
    (["--moe-num-experts", "6", "--moe-groups", "4"],
     "--moe-num-experts 6 is not divisible by --moe-groups 4"),
    (["--moe-groups", "-2"], "--moe-groups must be >= 0"),
    (["--moe-w-load", "inf"], "--moe-w-load must be a finite number >= 0; got inf"),
    (["--moe-w-importance", "nan"], "--moe-w-importance must be a finite number >= 0; got nan"),
    (["--bf16"], "--bf16 (and --memory-efficient-bf16) in fairseq 0.12 means TPU training"),
])
def test_bad_moe_options_end_fairseq_train_with_one_clear_line(tmp_path, extra, message):
    (tmp_path / "dict.txt").write_text("a 5\nb 4\n")
    result = subprocess.run(
        [os.path.join(BIN, "fairseq-train"), str(tmp_path), "--user-dir", USER_DIR,
         "--task", "language_modeling", "--arch", "lstm_moe_lm_wikitext2_demo",
         "--criterion", "smoe_cross_entropy", "--optimizer", "adam", "--lr", "1e-3",
         "--max-tokens", "512", "--cpu", "--save-dir", str(tmp_path / "ckpt"), *extra],
        capture_output=True, text=True, env=clean_env(), cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"fairseq-smoe: error: lstm_moe_lm: {message}" in result.stderr
    assert "Traceback" not in result.stderr
