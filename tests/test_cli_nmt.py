"""End to end through the fairseq command-line tools: a tiny lstm_moe_nmt learns to reverse
sequences (fairseq-preprocess → fairseq-train → fairseq-generate / fairseq-interactive), for
strictly balanced (App. F) and noisy top-k gating; the hierarchical preset trains and resumes.

Also checks App. F at inference: the learned thresholds give each expert about the share of
tokens it took in training (k/n), and tokens that reach no expert are counted, not hidden."""

import os
import random
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, ".venv", "bin")
pytestmark = pytest.mark.slow

SYMBOLS = [chr(ord("a") + i) for i in range(12)]
TRAIN_ARGS = [
    "--user-dir", "fairseq_smoe", "--task", "translation", "--cpu", "--seed", "1",
    "--criterion", "smoe_label_smoothed_cross_entropy", "--label-smoothing", "0",
    "--optimizer", "adam", "--lr", "0.01", "--lr-scheduler", "warmup_hold_inverse_sqrt",
    "--warmup-updates", "20", "--hold-updates", "1000", "--max-tokens", "1000",
    "--dropout", "0", "--num-workers", "0", "--log-format", "simple", "--log-interval", "50",
    "--no-epoch-checkpoints",
]


def run(tool, *args, stdin=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([os.path.join(BIN, tool), *args], cwd=ROOT, env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{tool} failed:\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def reversal_data(tmp_path_factory):
    """Sequences of 3-10 symbols and their reversals, binarized with one joined dictionary."""
    root = tmp_path_factory.mktemp("reverse")
    rng = random.Random(0)
    for split, count in (("train", 3000), ("valid", 100), ("test", 100)):
        with open(root / f"{split}.src", "w") as src, open(root / f"{split}.tgt", "w") as tgt:
            for _ in range(count):
                sequence = [rng.choice(SYMBOLS) for _ in range(rng.randint(3, 10))]
                src.write(" ".join(sequence) + "\n")
                tgt.write(" ".join(reversed(sequence)) + "\n")
    run("fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt",
        "--trainpref", str(root / "train"), "--validpref", str(root / "valid"),
        "--testpref", str(root / "test"), "--destdir", str(root / "bin"),
        "--joined-dictionary", "--workers", "1")
    return root


def train(data, save_dir, arch, max_update, *extra):
    return run("fairseq-train", str(data / "bin"), *TRAIN_ARGS, "--arch", arch,
               "--max-update", str(max_update), "--save-dir", str(save_dir), *extra)


def generate_bleu(data, checkpoint, *extra):
    output = run("fairseq-generate", str(data / "bin"), "--user-dir", "fairseq_smoe", "--cpu",
                 "--path", str(checkpoint), "--gen-subset", "test", "--beam", "4",
                 "--batch-size", "64", "--required-batch-size-multiple", "1", *extra)
    assert "Translated 100 sentences" in output, output[-2000:]
    match = re.search(r"BLEU4? = ([\d.]+)", output) or re.search(r'"score": ([\d.]+)', output)
    assert match, output[-2000:]
    print(next(line for line in output.splitlines() if match.group(0) in line), file=sys.stderr)
    return float(match.group(1)), output


def last_valid_line(log):
    lines = [line for line in log.splitlines() if "| valid |" in line]
    assert lines, log[-3000:]
    return lines[-1]


def eval_expert_shares(data, checkpoint):
    """Run the trained model in eval mode (App. F thresholds) over the test set and return,
    per MoE layer, (tokens, per-expert counts, unrouted tokens)."""
    from fairseq import checkpoint_utils

    from fairseq_smoe.plugin import install

    install()  # registers the plugin with fairseq, installs its patches

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(checkpoint)], arg_overrides={"data": str(data / "bin")})
    model = models[0].eval()
    task.load_dataset("test")
    dataset = task.dataset("test")
    batch = dataset.collater([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        _, extra = model(**batch["net_input"])
    return {name: (int(s.num_tokens), s.counts.tolist(), int(s.unrouted))
            for name, s in extra["moe_stats"].items()}


def test_batchwise_gating_learns_to_reverse(reversal_data, tmp_path):
    log = train(reversal_data, tmp_path, "lstm_moe_nmt_tiny", 300)
    valid = last_valid_line(log)
    for name in ("encoder_moe", "decoder_moe"):  # the criterion logs the eval-mode routing
        assert f"{name}_unrouted" in valid and f"{name}_max_load" in valid
    bleu, output = generate_bleu(reversal_data, tmp_path / "checkpoint_last.pt", "--print-alignment")
    assert bleu > 70, output[-1500:]
    # Attention of a reversal model is the anti-diagonal: target i attends to source n-1-i, in the
    # source positions fairseq gives the model (left-padded), as --print-alignment reads them.
    lines = dict(line.split("\t", 1) for line in output.splitlines() if line[:2] in ("S-", "A-"))
    pairs = [(len(lines["S-" + key[2:]].split()), pair) for key in lines if key.startswith("A-")
             for pair in lines[key].split()]
    anti_diagonal = sum(int(p.split("-")[0]) == n - 1 - int(p.split("-")[1]) for n, p in pairs)
    assert anti_diagonal > 0.9 * len(pairs), (anti_diagonal, len(pairs))

    # App. F: in training every expert takes exactly m = k·|X|/n tokens, a share k/n = 0.5 of the
    # tokens (k = 2, n = 4). In eval the learned thresholds decide alone; each expert's share
    # should stay near k/n, and the unrouted tokens are reported. (With --lr 0.02 instead of
    # 0.01 the gate softmax saturates, the training masks cut at probabilities ~1e-4, and the
    # thresholds cannot follow: one encoder expert then took every token in eval.)
    shares = eval_expert_shares(reversal_data, tmp_path / "checkpoint_last.pt")
    print("eval-mode expert shares (train: 0.5 each):",
          {name: ([round(c / t, 3) for c in counts], round(unrouted / t, 4))
           for name, (t, counts, unrouted) in shares.items()}, file=sys.stderr)
    for name, (tokens, counts, unrouted) in shares.items():
        assert tokens > 0
        for count in counts:
            assert 0.25 < count / tokens < 0.75, (name, counts, tokens)
        assert unrouted / tokens < 0.1, (name, unrouted, tokens)

    # fairseq-interactive reads raw lines and decodes them with the same checkpoint.
    out = run("fairseq-interactive", str(reversal_data / "bin"), "--user-dir", "fairseq_smoe",
              "--cpu", "--path", str(tmp_path / "checkpoint_last.pt"), "--beam", "4",
              "--source-lang", "src", "--target-lang", "tgt", stdin="a b c d\nl k j i h\n")
    hypotheses = [line.split("\t")[2] for line in out.splitlines() if line.startswith("H-")]
    assert hypotheses == ["d c b a", "h i j k l"], out[-1500:]


def test_noisy_top_k_gating_learns_to_reverse(reversal_data, tmp_path):
    train(reversal_data, tmp_path, "lstm_moe_nmt_tiny", 450, "--moe-gating", "noisy_top_k")
    bleu, output = generate_bleu(reversal_data, tmp_path / "checkpoint_last.pt",
                                 "--scoring", "sacrebleu")
    assert bleu > 70, output[-1500:]


def test_hierarchical_preset_trains_and_resumes(reversal_data, tmp_path):
    log = train(reversal_data, tmp_path, "lstm_moe_nmt_tiny_h", 10, "--max-tokens", "300")
    assert "num_updates 10" in log
    assert re.search(r"encoder_moe_cv_imp[ =]", log) and re.search(r"decoder_moe_cv_imp[ =]", log)
    state = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["args"] is None or state["args"].arch == "lstm_moe_nmt_tiny_h" or \
        state["cfg"]["model"].arch == "lstm_moe_nmt_tiny_h"
    assert any(key.endswith("secondary_gates.w_gate") for key in state["model"])  # [a, d, b]
    # Resume: the same command with a larger --max-update continues from update 10.
    log = train(reversal_data, tmp_path, "lstm_moe_nmt_tiny_h", 16, "--max-tokens", "300")
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 10 updates\)", log), log[-3000:]
    assert "num_updates 16" in log


def test_interactive_skips_lines_not_in_utf8_and_names_too_long_inputs(reversal_data, tmp_path):
    """A Latin-1 line among UTF-8 ones is skipped with a warning and the others are translated
    (fairseq stopped at it with a UnicodeDecodeError); an input longer than the model's positions
    is one line naming the options (was a traceback)."""
    train(reversal_data, tmp_path, "lstm_moe_nmt_tiny", 5, "--max-source-positions", "16")
    command = [os.path.join(BIN, "fairseq-interactive"), str(reversal_data / "bin"), "--user-dir",
               "fairseq_smoe", "--cpu", "--path", str(tmp_path / "checkpoint_last.pt"),
               "--source-lang", "src", "--target-lang", "tgt"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=300,
                          input="a b c\n".encode() + "caf\u00e9 b\n".encode("latin-1") + b"d e\n")
    output = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0, output[-3000:]
    assert len([line for line in output.splitlines() if line.startswith("H-")]) == 2, output[-3000:]
    assert "standard input line 2 is not UTF-8" in output
    long_line = " ".join(SYMBOLS[i % len(SYMBOLS)] for i in range(40)) + "\n"
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=300, text=True,
                          input=long_line)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    lines = [line for line in output.splitlines() if "fairseq-smoe: error:" in line]
    assert len(lines) == 1 and "--max-source-positions" in lines[0], output[-3000:]
    assert "--skip-invalid-size-inputs-valid-test" in lines[0] and "Traceback" not in output
