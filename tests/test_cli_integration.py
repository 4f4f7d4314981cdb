"""fairseq's own tooling around the plugin: --tensorboard-logdir gets every moe_ metric, the
validation loss is the model's loss, a plain criterion warns, fairseq-hydra-train runs."""

import glob
import os
import re
import subprocess

import pytest
from conftest import ROOT
from test_cli_lm import BIN, cli, corpus, train  # noqa: F401  (corpus: the tiny LM fixture)

pytestmark = pytest.mark.slow

MOE_TAGS = ["moe_loss", "moe_cv_imp", "moe_cv_load", "moe_max_load", "moe_min_load", "moe_dead",
            "moe_unrouted"]


def stat(line, name):
    found = re.search(rf"(?:^|\| |\s){name}[ =]([-\d.]+)", line)
    assert found, f"{name} not in {line}"
    return float(found.group(1))


def test_tensorboard_has_every_moe_metric_and_valid_loss_is_the_nll(corpus, tmp_path):  # noqa: F811
    data, _ = corpus
    logdir = tmp_path / "tb"
    out = train(data / "bin", tmp_path / "ckpt", "lstm_moe_lm_tiny", 8,
                "--tensorboard-logdir", logdir, "--log-interval", 4)
    assert "tensorboard or required dependencies not found" not in out
    valid = [line for line in out.splitlines() if "valid on 'valid' subset" in line][-1]
    # No label smoothing: the validation loss is the NLL; the balance term is logged apart.
    assert stat(valid, "loss") == pytest.approx(stat(valid, "nll_loss"), abs=1.5e-3)
    assert stat(valid, "moe_loss") > 0
    assert "moe_balance" not in out and "moe_importance" not in out  # no duplicate, no vectors
    for split in ("train", "valid"):
        files = glob.glob(str(logdir / split / "events.out.tfevents.*"))
        assert files, f"no {split} events in {logdir}"
        content = b"".join(open(f, "rb").read() for f in files)
        missing = [tag for tag in MOE_TAGS if tag.encode() not in content]
        assert not missing, (split, missing)
        assert b"loss" in content and b"nll_loss" in content
    # fairseq-validate prints every batch's raw logging output: no per-expert numbers in it
    out = cli("fairseq-validate", data / "bin", "--user-dir", "fairseq_smoe", "--task",
              "language_modeling", "--path", tmp_path / "ckpt" / "checkpoint_last.pt", "--cpu",
              "--tokens-per-sample", 32, "--max-tokens", 512, "--log-format", "simple",
              "--log-interval", 1, "--num-workers", 0)
    assert "moe_importance=[4 values]" in out, out[-2000:]
    assert not re.search(r"moe_(importance|load|counts)=\[[-\d.e]+, ", out)  # a list of numbers
    final = [line for line in out.splitlines() if "valid on 'valid' subset" in line][-1]
    assert stat(final, "loss") == pytest.approx(stat(final, "nll_loss"), abs=1.5e-3)


def test_a_criterion_that_ignores_the_balance_losses_warns_once(corpus, tmp_path):  # noqa: F811
    data, _ = corpus
    out = cli("fairseq-train", data / "bin", "--user-dir", "fairseq_smoe", "--task",
              "language_modeling", "--arch", "lstm_moe_lm_tiny", "--criterion", "cross_entropy",
              "--optimizer", "adam", "--lr", 0.01, "--tokens-per-sample", 32, "--max-tokens", 512,
              "--max-update", 2, "--cpu", "--num-workers", 0, "--log-format", "simple",
              "--save-dir", tmp_path / "ckpt", "--no-save")
    warnings = [line for line in out.splitlines() if "ignores their balance losses" in line]
    assert len(warnings) == 1, out[-3000:]
    assert "--criterion smoe_cross_entropy" in warnings[0] and "CrossEntropyCriterion" in warnings[0]
    quiet = train(data / "bin", tmp_path / "ckpt2", "lstm_moe_lm_tiny", 2, "--no-save")
    assert "ignores their balance losses" not in quiet


def _reversal_corpus(root):
    import random

    rng = random.Random(0)
    symbols = [chr(ord("a") + i) for i in range(12)]
    for split, count in (("train", 300), ("valid", 30)):
        with open(root / f"{split}.src", "w") as src, open(root / f"{split}.tgt", "w") as tgt:
            for _ in range(count):
                sequence = [rng.choice(symbols) for _ in range(rng.randint(3, 10))]
                src.write(" ".join(sequence) + "\n")
                tgt.write(" ".join(reversed(sequence)) + "\n")
    cli("fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt",
        "--trainpref", root / "train", "--validpref", root / "valid", "--destdir", root / "bin",
        "--joined-dictionary", "--workers", 1)
    return root / "bin"


@pytest.mark.parametrize("config", ["language_model/config/wikitext2_demo",
                                    "translation/config/multi30k_cpu"])
def test_fairseq_hydra_train_runs_the_shipped_configs(corpus, tmp_path, config):  # noqa: F811
    directory, name = os.path.split(os.path.join(ROOT, "examples", config))
    if config.startswith("language_model"):
        data = corpus[0] / "bin"
        overrides = ["model._name=lstm_moe_lm_tiny"]
    else:
        data = _reversal_corpus(tmp_path)
        overrides = [f"model.{k}=32" for k in ("encoder_embed_dim", "encoder_hidden_size",
                                                "attention_dim", "moe_hidden_dim")]
    save_dir = tmp_path / "ckpt"
    run_dir = tmp_path / "run"  # outside the repository: the plugin by its absolute path
    run_dir.mkdir()
    result = subprocess.run(
        [os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", directory, "--config-name", name,
         f"task.data={data}", f"checkpoint.save_dir={save_dir}", "optimization.max_update=3",
         f"common.user_dir={os.path.join(ROOT, 'fairseq_smoe')}",
         "dataset.validate_interval_updates=3", "common.log_interval=1", *overrides],
        cwd=run_dir, capture_output=True, text=True, timeout=240,
        env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "done training" in out, out[-3000:]
    assert os.listdir(run_dir) == []  # hydra leaves no .hydra/ or hydra_train.log behind
    assert (save_dir / "checkpoint_best.pt").is_file()
    assert "ignores their balance losses" not in out  # the configs use our criteria
    valid = [line for line in out.splitlines() if "valid on 'valid' subset" in line][-1]
    assert "moe_cv_imp" in valid and stat(valid, "num_updates") == 3


@pytest.mark.parametrize("override, status, expect", [
    ("model.moe_k=1", 0, "done training"),  # the documented form: the key is in the config
    ("model.moe_k=two", 2, "fairseq-smoe: error: lstm_moe_lm: --moe-k (model.moe_k) must be an integer; "
                           "got 'two'"),
    ("model.moe_num_experts=3", 0, "done training"),
    ("model.moe_k=9", 2, "fairseq-smoe: error: lstm_moe_lm: --moe-k 9 is larger than --moe-num-experts 4"),
])
def test_fairseq_hydra_train_overrides_and_errors(corpus, tmp_path, override, status, expect):  # noqa: F811
    """model.moe_* overrides of the shipped LM config; a plugin configuration error is one line
    with exit status 2 under hydra too (hydra caught it and printed a traceback, exit 1)."""
    directory, name = os.path.split(os.path.join(ROOT, "examples", "language_model/config/wikitext2_demo"))
    result = subprocess.run(
        [os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", directory, "--config-name", name,
         f"task.data={corpus[0] / 'bin'}", f"checkpoint.save_dir={tmp_path / 'ckpt'}",
         "optimization.max_update=1", "dataset.validate_interval_updates=1",
         f"common.user_dir={os.path.join(ROOT, 'fairseq_smoe')}", "model._name=lstm_moe_lm_tiny",
         override],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
        env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    out = result.stdout + result.stderr
    assert result.returncode == status and expect in out, out[-3000:]
    if status:
        assert "Traceback" not in out
