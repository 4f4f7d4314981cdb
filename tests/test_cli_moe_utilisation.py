"""scripts/moe_utilisation.py on tiny checkpoints: a translation model (encoder and decoder MoE,
source and target words) and a hierarchical language model (group x expert table), with
eval-mode and training-mode routing."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT
from test_cli_integration import _reversal_corpus
from test_cli_lm import cli, corpus, train  # noqa: F401  (corpus: the tiny LM fixture)

pytestmark = pytest.mark.slow
PYTHON = os.path.join(ROOT, ".venv", "bin", "python") if os.path.isdir(os.path.join(ROOT, ".venv")) \
    else sys.executable


def utilisation(*args):
    result = subprocess.run([PYTHON, "scripts/moe_utilisation.py", *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=180,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_translation_checkpoint_reports_encoder_and_decoder_layers(tmp_path):
    data = _reversal_corpus(tmp_path)
    cli("fairseq-train", data, "--user-dir", "fairseq_smoe", "--task", "translation", "--cpu",
        "--arch", "lstm_moe_nmt_tiny", "--criterion", "smoe_label_smoothed_cross_entropy",
        "--optimizer", "adam", "--lr", 0.01, "--max-tokens", 1000, "--max-update", 5,
        "--num-workers", 0, "--save-dir", tmp_path / "ckpt", "--no-epoch-checkpoints",
        "--disable-validation")
    reports = {}
    for routing in ("eval", "train"):
        report = tmp_path / f"{routing}.json"
        out = utilisation("--path", tmp_path / "ckpt" / "checkpoint_last.pt", "--data", data,
                          "--subset", "valid", "--routing", routing, "--min-count", 1,
                          "--json", report, "--plot", tmp_path / f"{routing}.png")
        assert "Layer 'encoder_moe'" in out and "Layer 'decoder_moe'" in out
        assert "source words" in out and "target words" in out
        reports[routing] = json.loads(report.read_text())
        assert (tmp_path / f"{routing}.png").stat().st_size > 0
    source_tokens = sum(len(line.split()) for line in open(tmp_path / "valid.src"))
    for routing, result in reports.items():
        assert result["routing"] == routing
        encoder, decoder = result["layers"]["encoder_moe"], result["layers"]["decoder_moe"]
        # every token of the 30 pairs (each side ends with </s>), no padding
        assert encoder["tokens"] == decoder["tokens"] == source_tokens + 30
        for layer in (encoder, decoder):
            routed = sum(e["tokens"] for e in layer["experts"])
            if routing == "train":  # batchwise top-m: k = 2 per token on average (m rounded)
                assert routed == pytest.approx(2 * layer["tokens"], rel=0.05)
            else:  # App. F thresholds: any number per token, none for the unrouted
                assert routed > 0 and layer["unrouted_tokens"] < layer["tokens"]
            assert sum(e["share"] for e in layer["experts"]) == pytest.approx(1.0)
        # the words listed are of the right side: symbols a-l on both sides here
        words = {w for e in encoder["experts"] for w in e["words"]}
        assert words and words <= {chr(ord("a") + i) for i in range(12)} | {"</s>"}
    # App. F: training mode routes exactly k per token (batchwise top-m), eval its thresholds
    train_enc = reports["train"]["layers"]["encoder_moe"]
    assert train_enc["cv_load"] < 0.05  # strictly balanced in training


def test_hierarchical_layer_gets_a_group_by_expert_table(corpus, tmp_path):  # noqa: F811
    data, _ = corpus
    train(data / "bin", tmp_path / "ckpt", "lstm_moe_lm_tiny_h", 5, "--disable-validation")
    outs = {}
    for routing in ("eval", "train"):
        report = tmp_path / f"{routing}.json"
        outs[routing] = utilisation("--path", tmp_path / "ckpt" / "checkpoint_last.pt", "--data",
                                    data / "bin", "--subset", "test", "--max-tokens", 1000,
                                    "--block", 32, "--min-count", 2, "--routing", routing,
                                    "--json", report, "--plot", tmp_path / f"{routing}.png")
        result = json.loads(report.read_text())
        assert result["groups"] == 4 and result["experts_per_group"] == 4
        assert len(result["experts"]) == 16
        tokens = 1000 // 32 * 32
        assert result["tokens"] == tokens
        # noisy top-2 of groups, top-2 within each: k = 4 experts per token, none unrouted
        assert sum(e["tokens"] for e in result["experts"]) == 4 * tokens
        assert "group (row) x expert in group (column)" in outs[routing]
        grid_rows = [line for line in outs[routing].splitlines()
                     if line.strip() and line.split()[0].isdigit() and len(line.split()) == 6]
        assert len(grid_rows) == 4
        assert sum(float(r.split()[-1]) for r in grid_rows) == pytest.approx(100, abs=0.05)
        assert any(e["words"] for e in result["experts"])  # words per expert, hierarchical too
    # training-mode noise changes the routing
    assert outs["eval"].split("Layer")[1] != outs["train"].split("Layer")[1]


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the fix, before any analysis.

def refused(*args, usage=False):
    """(the error line, stdout) of a run that must end with one line of error and status 2
    (after argparse's usage lines when ``usage``)."""
    result = subprocess.run([PYTHON, "scripts/moe_utilisation.py", *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=180,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert usage or len(lines) == 1, result.stderr
    return lines[-1], result.stdout


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):  # noqa: F811
    """(LM data folder, LM checkpoint, translation data folder, translation checkpoint),
    each trained for one update."""
    root = tmp_path_factory.mktemp("utilisation_faults")
    lm_data = corpus[0] / "bin"
    train(lm_data, root / "lm", "lstm_moe_lm_tiny", 1, "--disable-validation")
    mt_data = _reversal_corpus(root)
    cli("fairseq-train", mt_data, "--user-dir", "fairseq_smoe", "--task", "translation", "--cpu",
        "--arch", "lstm_moe_nmt_tiny", "--criterion", "smoe_label_smoothed_cross_entropy",
        "--optimizer", "adam", "--lr", 0.01, "--max-tokens", 1000, "--max-update", 1,
        "--num-workers", 0, "--save-dir", root / "mt", "--no-epoch-checkpoints",
        "--disable-validation")
    return lm_data, root / "lm" / "checkpoint_last.pt", mt_data, root / "mt" / "checkpoint_last.pt"


def test_data_of_the_other_task_is_refused_in_one_line(trained):
    lm_data, lm_ckpt, mt_data, mt_ckpt = trained
    line, _ = refused("--path", lm_ckpt, "--data", mt_data, "--subset", "valid")
    assert "is a language model (task language_modeling)" in line
    assert "translation data (dict.src.txt, dict.tgt.txt)" in line
    assert "scripts/prepare-wikitext2.sh" in line
    line, _ = refused("--path", mt_ckpt, "--data", lm_data, "--subset", "test")
    assert "is a translation model (task translation)" in line
    assert "language-model data (dict.txt)" in line and "scripts/prepare-multi30k.sh" in line


def test_a_dictionary_of_another_size_is_refused_in_one_line(trained, tmp_path):
    lm_data, lm_ckpt, _, _ = trained
    other = tmp_path / "bin"
    shutil.copytree(lm_data, other)
    with open(other / "dict.txt", "a") as f:
        f.write("extra1 1\nextra2 1\n")
    line, _ = refused("--path", lm_ckpt, "--data", other, "--subset", "test")
    trained_size = sum(1 for _ in open(lm_data / "dict.txt")) + 4  # + fairseq's 4 specials
    assert f"dict.txt has {trained_size + 2} entries" in line
    assert f"trained with a dictionary of {trained_size}" in line
    assert "give --data the folder the checkpoint was trained on" in line


@pytest.mark.parametrize("block", [0, -3])
def test_block_must_be_positive(trained, block):
    lm_data, lm_ckpt, _, _ = trained
    line, _ = refused("--path", lm_ckpt, "--data", lm_data, "--block", block, usage=True)
    assert line.startswith("moe_utilisation.py: error: argument --block: must be a positive")


def test_unwritable_json_is_refused_before_the_analysis(trained, tmp_path):
    lm_data, lm_ckpt, _, _ = trained
    target = tmp_path / "no-such-folder" / "report.json"
    line, out = refused("--path", lm_ckpt, "--data", lm_data, "--subset", "test",
                        "--block", 32, "--json", target)
    assert f"cannot write --json {target}" in line and "does not exist" in line
    assert "Layer" not in out  # nothing analysed
    line, out = refused("--path", lm_ckpt, "--data", lm_data, "--json", tmp_path)
    assert f"--json {tmp_path} is a directory" in line and "Layer" not in out
    assert not (tmp_path / "no-such-folder").exists()
