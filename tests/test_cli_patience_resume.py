"""--patience across a resume (compat.patience_resume): the count of epochs without a better
validation score is saved in every checkpoint and put back on resume, so an interrupted run stops
where the same run uninterrupted stops. fairseq 0.12 alone starts the count again."""

import re
from types import SimpleNamespace

import pytest
from test_cli_lm import cli, corpus  # noqa: F401  (corpus: the tiny LM fixture)

from fairseq_smoe.compat import patience_resume
from fairseq_smoe.plugin import install

install()


def checkpoint_cfg(metric="bleu", maximize=True):
    return SimpleNamespace(best_checkpoint_metric=metric, maximize_best_checkpoint_metric=maximize)


@pytest.fixture
def counter(monkeypatch):
    from fairseq_cli import train

    for name in ("best", "num_runs"):
        monkeypatch.delattr(train.should_stop_early, name, raising=False)
    return train.should_stop_early


def test_state_is_saved_after_the_first_validation_and_restored_where_it_applies(counter):
    assert patience_resume.patience_state(checkpoint_cfg()) is None  # no validation yet
    counter.best, counter.num_runs = 38.9, 3
    state = patience_resume.patience_state(checkpoint_cfg())
    assert state == {"best": 38.9, "num_runs": 3, "metric": "bleu", "maximize": True}
    del counter.best, counter.num_runs
    # fairseq's own condition for restoring the best score: optimizer and meters kept
    assert not patience_resume.restore_patience(state, checkpoint_cfg(), True, False)
    assert not patience_resume.restore_patience(state, checkpoint_cfg(), False, True)
    # another metric or direction: its numbers mean something else
    assert not patience_resume.restore_patience(state, checkpoint_cfg("loss", False), False, False)
    assert not patience_resume.restore_patience(state, checkpoint_cfg("bleu", False), False, False)
    assert not patience_resume.restore_patience(None, checkpoint_cfg(), False, False)  # old file
    assert getattr(counter, "best", None) is None
    assert patience_resume.restore_patience(state, checkpoint_cfg(), False, False)
    assert (counter.best, counter.num_runs) == (38.9, 3)


def validated_epochs(output):
    return [int(e) for e in re.findall(r"\| valid \| epoch (\d+) \| valid on 'valid' subset", output)]


@pytest.mark.slow
def test_interrupted_run_stops_where_the_uninterrupted_one_does(corpus, tmp_path):  # noqa: F811
    """The best checkpoint metric is the validation loss, maximised: epoch 1 (the highest loss)
    stays the best, so with --patience 2 a run stops after epoch 3. Interrupted after epoch 2 and
    resumed, it still stops after epoch 3 (fairseq alone would count epoch 3 as the new best and
    train to epoch 5)."""
    root, _ = corpus

    def train(max_epoch):
        return cli("fairseq-train", root / "bin", "--user-dir", "fairseq_smoe",
                   "--task", "language_modeling", "--arch", "lstm_moe_lm_tiny",
                   "--criterion", "smoe_cross_entropy", "--optimizer", "adam", "--lr", 0.01,
                   "--tokens-per-sample", 32, "--sample-break-mode", "none", "--max-tokens", 2048,
                   "--cpu", "--num-workers", 0, "--seed", 1, "--log-format", "simple",
                   "--save-dir", tmp_path, "--no-epoch-checkpoints", "--max-epoch", max_epoch,
                   "--best-checkpoint-metric", "loss", "--maximize-best-checkpoint-metric",
                   "--patience", 2)

    assert validated_epochs(train(2)) == [1, 2]
    resumed = train(10)
    assert "--patience resumes: best loss" in resumed and "1 epoch(s) without improvement" in resumed
    assert validated_epochs(resumed) == [3]
    assert "early stop since valid performance hasn't improved for last 2 runs" in resumed
