"""End to end through the fairseq CLIs: fairseq-preprocess, fairseq-train (flat, hierarchical,
batchwise and baseline presets, resume), fairseq-eval-lm and fairseq-interactive sampling on a
tiny synthetic corpus that a language model can learn."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

BIN = os.path.join(ROOT, ".venv", "bin") if os.path.isdir(os.path.join(ROOT, ".venv")) else \
    os.path.dirname(sys.executable)
pytestmark = pytest.mark.slow


def cli(tool, *args, timeout=240, stdin=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run([os.path.join(BIN, tool), *map(str, args)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout, input=stdin)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{tool} failed:\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def corpus(synthetic_lm_corpus):
    """(folder with bin/, unigram test perplexity): conftest builds it once per session."""
    return synthetic_lm_corpus


def train(data, save_dir, arch, updates, *extra):
    return cli("fairseq-train", data, "--user-dir", "fairseq_smoe", "--task", "language_modeling",
               "--arch", arch, "--criterion", "smoe_cross_entropy", "--optimizer", "adam",
               "--lr", 0.01, "--lr-scheduler", "inverse_sqrt", "--warmup-updates", 5,
               "--tokens-per-sample", 32, "--sample-break-mode", "none", "--max-tokens", 512,
               "--max-update", updates, "--cpu", "--num-workers", 0, "--seed", 1,
               "--log-format", "simple", "--log-interval", 5, "--save-dir", save_dir,
               "--no-epoch-checkpoints", "--validate-interval-updates", updates, *extra)


def last_valid_ppl(output):
    found = re.findall(r"valid on 'valid' subset \|.* ppl (\d+(?:\.\d+)?)", output)
    assert found, output[-3000:]
    return float(found[-1])


def test_train_resume_and_eval_lm_beats_unigram(corpus, tmp_path):
    root, unigram_ppl = corpus
    data, ckpt = root / "bin", tmp_path / "flat"
    out = train(data, ckpt, "lstm_moe_lm_tiny", 20)
    assert "moe_cv_imp" in out and "moe_max_load" in out  # per-layer balance metrics logged
    out = train(data, ckpt, "lstm_moe_lm_tiny", 40)  # resumes from checkpoint_last.pt
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 20 updates\)", out), out[-3000:]
    assert re.search(r"num_updates 40\b", out)
    assert last_valid_ppl(out) < unigram_ppl

    out = cli("fairseq-eval-lm", data, "--user-dir", "fairseq_smoe", "--path", ckpt / "checkpoint_last.pt",
              "--gen-subset", "test", "--tokens-per-sample", 32, "--max-tokens", 1024, "--cpu")
    ppl = float(re.search(r"Perplexity: (\d+(?:\.\d+)?)", out).group(1))
    assert 1.0 < ppl < 0.8 * unigram_ppl, (ppl, unigram_ppl)

    out = cli("fairseq-interactive", data, "--task", "language_modeling", "--user-dir", "fairseq_smoe",
              "--path", ckpt / "checkpoint_last.pt", "--cpu", "--sampling", "--sampling-topk", 5,
              "--beam", 1, "--max-len-b", 8, "--seed", 2, stdin="w0 w1\n")
    hypothesis = re.search(r"^H-0\t(\S+)\t(.*)$", out, re.M)
    assert hypothesis and hypothesis.group(2).startswith("w0 w1"), out[-2000:]
    assert len(hypothesis.group(2).split()) > 2

    report = tmp_path / "experts.json"
    python = os.path.join(BIN, "python") if os.path.exists(os.path.join(BIN, "python")) else sys.executable
    args = ["--path", ckpt / "checkpoint_last.pt", "--data", data, "--subset", "test",
            "--max-tokens", 1000, "--block", 32, "--min-count", 5, "--json", report]
    result = subprocess.run([python, "scripts/moe_utilisation.py", *map(str, args)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    experts = json.loads(report.read_text())
    assert len(experts["experts"]) == 4 and "CV(Importance)" in result.stdout
    tokens = 1000 // 32 * 32  # whole blocks; every token visits k = 2 experts
    assert sum(e["tokens"] for e in experts["experts"]) == 2 * tokens
    assert sum(e["share"] for e in experts["experts"]) == pytest.approx(1.0)
    assert sum(e["gate_share"] for e in experts["experts"]) == pytest.approx(1.0)


@pytest.mark.parametrize("arch", ["lstm_moe_lm_tiny_h", "lstm_moe_lm_tiny_batchwise",
                                  "lstm_moe_lm_tiny_4xlstm"])
def test_other_presets_train_and_validate(corpus, tmp_path, arch):
    root, unigram_ppl = corpus
    out = train(root / "bin", tmp_path / arch, arch, 25)
    assert re.search(r"num_updates 25\b", out)
    assert last_valid_ppl(out) < unigram_ppl
    has_moe = arch != "lstm_moe_lm_tiny_4xlstm"
    assert ("moe_cv_imp" in out) == has_moe
    assert (tmp_path / arch / "checkpoint_last.pt").exists()
