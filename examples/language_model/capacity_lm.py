#!/usr/bin/env python3
"""The paper's central claim on real text in its regime, data ≫ active capacity.

Table 7 / Figure 2-left of the paper: at one compute per time step, test perplexity falls as the
experts grow, while computationally matched dense baselines stay put. That holds where the data
is large against what the model computes per token (1B words at about 8M operations a time
step). With WikiText-2 fixed at about 2M words, this experiment shrinks the model instead:
subword units (subword-nmt BPE on the training text, so embeddings and softmax stay small), a
small width, no dropout, and enough epochs that the dense baseline *underfits* (its perplexity on
the training text stays close to its validation perplexity). The protocol, chosen with pilots of
the dense baseline only, is declared in examples/language_model/capacity_protocol.md.

Two stages, each resumable (a run with a result is skipped; an interrupted one continues from its
checkpoint_last.pt in outputs/capacity_lm/RUN/, git-ignored):

    capacity_lm.py --stage pilots     4xLSTM at each pilot width, seed 1; the declared rule then
                                      gives the family's width W (printed, and used below)
    capacity_lm.py                    the family at W, three seeds each:
        moe-1-wide  one expert of hidden 8W (= the active compute of 4 experts of 2W)
        4xlstm      no MoE; two LSTMs below and two above (App. C's matched baseline)
        moe-4, moe-16, moe-64, moe-256   flat, noisy top-4, experts W → 2W → W, w = 0.1
        moe-256-h   hierarchical (App. B): 16 groups × 16 experts, top-2 at each level
    capacity_lm.py --report           tables and plot only
    capacity_lm.py --runs moe-16:1,4xlstm:2 --jobs 2

Every run: fairseq-train for EPOCHS epochs (validation each epoch, checkpoint_best.pt kept), then
fairseq-eval-lm of checkpoint_best.pt on the training, validation and test text. Results go to
examples/language_model/results/capacity.json (capacity_pilots.json for the pilots) as they
arrive; the tables to capacity.md and the plots to capacity.png / capacity_curves.png.
"""

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import experiment_tools as tools  # noqa: E402

BIN = os.path.join(ROOT, ".venv", "bin")
WORK = os.path.join(ROOT, "outputs", "capacity_lm")
DATA = os.path.join(WORK, "data")
RESULTS = os.path.join(ROOT, "examples", "language_model", "results")

# ---- The protocol (capacity_protocol.md, committed before any MoE run; changed only by a new one) ----
BPE_MERGES = 4000          # subword-nmt merges learnt on the training text
TOKENS_PER_SAMPLE = 128    # --tokens-per-sample (training and evaluation)
MAX_TOKENS = 4096          # tokens per batch
EPOCHS = 5                 # every run sees the same tokens: EPOCHS full epochs
LR, WARMUP = 0.004, 400    # Adam (0.9, 0.98), inverse square root after a linear warmup
SEEDS = (1, 2, 3)
# The width W is chosen by the pilots of the dense baseline alone (4xLSTM, seed 1, the family's
# exact configuration), by this rule: the largest pilot width whose 4xLSTM underfits
# (valid/train perplexity <= MAX_GAP at the end) and whose whole family fits the CPU budget
# (21 runs, each estimated at MOE_COST x the pilot's wall time, two side by side, within
# BUDGET_HOURS); if none qualifies, the smallest width. The pilot at W is the family's 4xLSTM
# seed 1 (the same command).
PILOT_WIDTHS = (64, 128)
MAX_GAP = 1.10
MOE_COST = 1.5             # an MoE run's wall time over the baseline's, assumed (not measured)
BUDGET_HOURS = 16.0


def model_options(model: str, width: int):
    """fairseq-train options of ``model`` at ``width`` (embedding = LSTM units = W)."""
    common = ["--arch", "lstm_moe_lm", "--decoder-embed-dim", str(width),
              "--decoder-hidden-size", str(width), "--dropout", "0"]
    flat = ["--moe-k", "4", "--moe-hidden-dim", str(2 * width), "--moe-gating", "noisy_top_k",
            "--moe-w-importance", "0.1", "--moe-w-load", "0.1"]
    if model == "4xlstm":
        return common + ["--moe-num-experts", "0", "--lstm-layers-before-moe", "2",
                         "--lstm-layers-after-moe", "2"]
    if model == "moe-1-wide":  # one expert has nothing to choose: plain gating, k = 1
        return common + ["--moe-num-experts", "1", "--moe-k", "1", "--moe-hidden-dim", str(8 * width),
                         "--moe-gating", "top_k"]
    if model == "moe-256-h":
        return common + ["--moe-num-experts", "256", "--moe-groups", "16", "--moe-k", "2",
                         "--moe-hidden-dim", str(2 * width), "--moe-gating", "noisy_top_k",
                         "--moe-w-importance", "0.1", "--moe-w-load", "0.1"]
    experts = int(model.split("-")[1])
    return common + ["--moe-num-experts", str(experts)] + flat


FAMILY = ["4xlstm", "moe-1-wide", "moe-4", "moe-16", "moe-64", "moe-256", "moe-256-h"]
EXPERTS = {"4xlstm": 0, "moe-1-wide": 1, "moe-4": 4, "moe-16": 16, "moe-64": 64, "moe-256": 256,
           "moe-256-h": 256}


def say(message):
    tools.say("capacity_lm", message)


def results_path(stage):
    return os.path.join(RESULTS, "capacity_pilots.json" if stage == "pilots" else "capacity.json")


def run_name(model, width, seed):
    return f"{model}-w{width}.seed{seed}"


def choose_width(pilots):
    """The declared rule (above) applied to the pilots' results; None until every pilot is in.
    Returns (width, why)."""
    by_width = {r["width"]: r for r in pilots["runs"] if r["model"] == "4xlstm" and r["seed"] == 1}
    if any(w not in by_width for w in PILOT_WIDTHS):
        return None, "pilots missing: " + ", ".join(str(w) for w in PILOT_WIDTHS if w not in by_width)
    verdicts = []
    for width in PILOT_WIDTHS:
        r = by_width[width]
        gap = r["valid_ppl"] / r["train_ppl"]
        hours = len(FAMILY) * len(SEEDS) * MOE_COST * r["wall_s"] / 2 / 3600
        verdicts.append((width, gap <= MAX_GAP and hours <= BUDGET_HOURS, gap, hours))
    qualified = [w for w, ok, _, _ in verdicts if ok]
    width = max(qualified) if qualified else min(PILOT_WIDTHS)
    why = "; ".join(f"W={w}: valid/train {g:.3f} (<= {MAX_GAP}: {'yes' if g <= MAX_GAP else 'no'}), "
                    f"family about {h:.1f} h (<= {BUDGET_HOURS}: {'yes' if h <= BUDGET_HOURS else 'no'})"
                    for w, _, g, h in verdicts)
    return width, why


# ---- Data ---------------------------------------------------------------------------------

def prepare_data():
    """WikiText-2 (shipped) → BPE_MERGES subword units → fairseq binaries in DATA/bin."""
    bin_dir = os.path.join(DATA, "bin")
    if os.path.exists(os.path.join(bin_dir, ".done")):
        return bin_dir
    raw = os.path.join(ROOT, "outputs", "data", "wikitext-2", "raw")
    if not os.path.exists(os.path.join(raw, "test.tokens")):
        say("extracting WikiText-2 (scripts/prepare-wikitext2.sh)")
        subprocess.run(["bash", os.path.join(ROOT, "scripts", "prepare-wikitext2.sh")], cwd=ROOT,
                       check=True)
    bpe = os.path.join(DATA, "bpe")
    os.makedirs(bpe, exist_ok=True)
    codes = os.path.join(bpe, "codes")
    if not os.path.exists(codes):
        say(f"learning {BPE_MERGES} BPE merges on the training text (subword-nmt)")
        with open(os.path.join(raw, "train.tokens")) as src, open(codes + ".tmp", "w") as dst:
            subprocess.run([os.path.join(BIN, "subword-nmt"), "learn-bpe", "-s", str(BPE_MERGES)],
                           stdin=src, stdout=dst, check=True)
        os.replace(codes + ".tmp", codes)
    for split in ("train", "valid", "test"):
        target = os.path.join(bpe, f"{split}.bpe")
        if os.path.exists(target):
            continue
        say(f"applying BPE to {split}")
        with open(os.path.join(raw, f"{split}.tokens")) as src, open(target + ".tmp", "w") as dst:
            subprocess.run([os.path.join(BIN, "subword-nmt"), "apply-bpe", "-c", codes],
                           stdin=src, stdout=dst, check=True)
        os.replace(target + ".tmp", target)
    say("binarizing with fairseq-preprocess")
    shutil.rmtree(bin_dir, ignore_errors=True)
    subprocess.run([os.path.join(BIN, "fairseq-preprocess"), "--only-source", "--task",
                    "language_modeling", "--trainpref", os.path.join(bpe, "train.bpe"),
                    "--validpref", os.path.join(bpe, "valid.bpe"), "--testpref",
                    os.path.join(bpe, "test.bpe"), "--destdir", bin_dir, "--workers", "2"],
                   check=True, capture_output=True)
    open(os.path.join(bin_dir, ".done"), "w").close()
    return bin_dir


# ---- One run ------------------------------------------------------------------------------

def train_and_evaluate(model, width, seed, epochs):
    data = prepare_data()
    work = os.path.join(WORK, run_name(model, width, seed))
    os.makedirs(work, exist_ok=True)
    train_log = os.path.join(work, "train.log")
    tools.run_logged([os.path.join(BIN, "fairseq-train"), data, "--user-dir", "fairseq_smoe",
                      "--task", "language_modeling", "--criterion", "smoe_cross_entropy",
                      *model_options(model, width),
                      "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", str(LR),
                      "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(WARMUP),
                      "--warmup-init-lr", "1e-7", "--clip-norm", "1.0",
                      "--tokens-per-sample", str(TOKENS_PER_SAMPLE), "--sample-break-mode", "none",
                      "--max-tokens", str(MAX_TOKENS), "--max-epoch", str(epochs), "--cpu",
                      "--num-workers", "0", "--seed", str(seed), "--log-format", "simple",
                      "--log-interval", "50", "--save-dir", os.path.join(work, "checkpoints"),
                      "--no-epoch-checkpoints"], train_log, ROOT)
    evaluation_started = time.time()
    ppl = {}
    for split in ("train", "valid", "test"):
        log = os.path.join(work, f"eval-{split}.log")
        tools.run_logged([os.path.join(BIN, "fairseq-eval-lm"), data, "--user-dir", "fairseq_smoe",
                          "--path", os.path.join(work, "checkpoints", "checkpoint_best.pt"),
                          "--gen-subset", split, "--tokens-per-sample", str(TOKENS_PER_SAMPLE),
                          "--max-tokens", "16384", "--cpu"], log, ROOT, mode="w")
        ppl[split], ppl[split + "_tokens"] = tools.eval_lm_result(log)
    with open(train_log) as f:
        log_text = f.read()
    stats = tools.last_train_stats(log_text)
    updates = int(float(stats.get("num_updates", 0)))
    wps = [float(w) for w in re.findall(r"train_inner \|.* wps=([\d.]+)", log_text)]
    costs = model_costs(model, width)
    result = {"model": model, "experts": EXPERTS[model], "seed": seed, "width": width,
              "epochs": epochs, "valid_ppl": ppl["valid"], "test_ppl": ppl["test"],
              "train_ppl": ppl["train"], "train_ppl_running_last_epoch": float(stats.get("ppl", "nan")),
              "tokens": ppl["train_tokens"] * epochs, "updates": updates,
              "valid_tokens": ppl["valid_tokens"], "test_tokens": ppl["test_tokens"],
              # the median of the logged intervals: one thread, a neighbour job on the other core
              "tokens_per_s": sorted(wps)[len(wps) // 2] if wps else None,
              "wall_s": (tools.training_wall(log_text) or 0) + round(time.time() - evaluation_started),
              "cpu": tools_cpu_name(), **costs}
    if costs["experts_per_token"] and EXPERTS[model]:
        result["tokens_per_expert"] = round(result["tokens"] * costs["experts_per_token"] / EXPERTS[model])
    for key in ("moe_cv_imp", "moe_cv_load", "moe_max_load", "moe_min_load", "moe_dead"):
        if key in stats:
            result[key + "_last_epoch"] = float(stats[key])
    result["curve"] = curves(train_log)
    return result


def model_costs(model, width):
    """Parameters and multiply-adds per token of the model (fairseq_smoe.models.lm_costs: the
    LSTMs and the MoE layer, as the paper counts; the embedding and softmax apart)."""
    sys.path.insert(0, ROOT)
    from fairseq.models import ARCH_CONFIG_REGISTRY

    from fairseq_smoe.models.lm_costs import expert_costs, gate_params, lm_costs
    from fairseq_smoe.plugin import install

    install()
    parser = argparse.ArgumentParser()
    for option in ("--decoder-embed-dim", "--decoder-hidden-size", "--moe-num-experts", "--moe-k",
                   "--moe-hidden-dim", "--moe-groups", "--lstm-layers-before-moe",
                   "--lstm-layers-after-moe"):
        parser.add_argument(option, type=int)
    parser.add_argument("--moe-gating")
    parser.add_argument("--moe-w-importance", type=float)
    parser.add_argument("--moe-w-load", type=float)
    parser.add_argument("--dropout", type=float)
    parser.add_argument("--arch")
    args, _ = parser.parse_known_args(model_options(model, width))
    for key in [k for k, v in vars(args).items() if v is None]:
        delattr(args, key)
    ARCH_CONFIG_REGISTRY["lstm_moe_lm"](args)
    costs = lm_costs(args)
    n = args.moe_num_experts or 0
    moe_params = 0
    if n:
        groups = args.moe_groups if (args.moe_groups or 0) > 1 else 0
        moe_params = n * expert_costs(width, args.moe_hidden_dim, 1)["params"]
        moe_params += (gate_params(args.moe_gating, width, groups)
                       + groups * gate_params(args.moe_gating, width, n // groups)) if groups \
            else gate_params(args.moe_gating, width, n)
    vocab = dictionary_size()
    return {"params": costs["params"], "moe_params": moe_params,
            "embedding_softmax_params": 2 * vocab * width if vocab else None,
            "ops_per_token": costs["ops"], "gate_ops_per_token": costs["gate_ops"],
            "softmax_ops_per_token": vocab * width if vocab else None,
            "experts_per_token": costs["experts_per_token"]}


def dictionary_size():
    path = os.path.join(DATA, "bin", "dict.txt")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return sum(1 for _ in f) + 4  # fairseq adds <s> <pad> </s> <unk>


def tools_cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return re.search(r"model name\s*:\s*(.*)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        return None


def curves(log_path):
    """(updates, training perplexity) per log interval, (updates, validation perplexity) per epoch."""
    train, valid = tools.learning_curves(log_path)
    return {"train": train, "valid": valid}


# ---- Report -------------------------------------------------------------------------------

def report(stage):
    results = tools.load_json(results_path(stage), {"runs": []})
    if not results["runs"]:
        say(f"no {stage} results yet")
        return
    order = FAMILY if stage == "family" else ["4xlstm"]
    by_key = {}
    for r in results["runs"]:
        by_key.setdefault((r["model"], r["width"]), []).append(r)
    lines = ["| model | width | seeds | test ppl | valid ppl | train ppl | valid/train | params (M) | "
             "MoE params (M) | tokens per expert | CV(Imp) | CV(Load) | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (model, width), runs in sorted(by_key.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]))):
        def spread(key, runs=runs):
            return tools.mean_and_half_range([r[key] for r in runs if r.get(key) is not None])

        ratio = tools.mean_and_half_range([r["valid_ppl"] / r["train_ppl"] for r in runs])
        per_expert = f"{runs[0]['tokens_per_expert']:,}" if "tokens_per_expert" in runs[0] else "-"
        lines.append(f"| {model} | {width} | {','.join(str(r['seed']) for r in runs)} | "
                     f"{spread('test_ppl')} | {spread('valid_ppl')} | {spread('train_ppl')} | {ratio} | "
                     f"{runs[0]['params'] / 1e6:.2f} | {runs[0]['moe_params'] / 1e6:.2f} | {per_expert} | "
                     f"{spread('moe_cv_imp_last_epoch')} | {spread('moe_cv_load_last_epoch')} | "
                     f"{spread('tokens_per_s')} |")
    name = "capacity_pilots.md" if stage == "pilots" else "capacity.md"
    tools.write_table(lines, os.path.join(RESULTS, name))
    if stage == "family":
        plot(results)


def plot(results):
    plt = tools.pyplot("capacity_lm")
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    by_model = {}
    for r in results["runs"]:
        by_model.setdefault(r["model"], []).append(r)

    def mean(runs, key):
        return sum(r[key] for r in runs) / len(runs)

    flat = [m for m in ("moe-4", "moe-16", "moe-64", "moe-256") if m in by_model]
    if flat:
        xs = [by_model[m][0]["moe_params"] for m in flat]
        ys = [mean(by_model[m], "test_ppl") for m in flat]
        errs = [(max(r["test_ppl"] for r in by_model[m]) - min(r["test_ppl"] for r in by_model[m])) / 2
                for m in flat]
        axes[0].errorbar(xs, ys, yerr=errs, marker="o", label="flat MoE (4, 16, 64, 256)")
    if "moe-256-h" in by_model:
        runs = by_model["moe-256-h"]
        axes[0].plot([runs[0]["moe_params"]], [mean(runs, "test_ppl")], "s", label="MoE-256-h")
    for i, model in enumerate(("4xlstm", "moe-1-wide")):
        if model in by_model:
            axes[0].axhline(mean(by_model[model], "test_ppl"), linestyle="--", color=f"C{i + 2}",
                            label=f"{model} (matched compute)")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("parameters in the MoE layer")
    axes[0].set_ylabel("test perplexity (mean over seeds, bars: half range)")
    axes[0].set_title("WikiText-2 BPE at one active compute (cf. the paper's Figure 2-left)", fontsize=10)
    axes[0].legend(fontsize=8)
    for i, model in enumerate(FAMILY):
        for r in by_model.get(model, []):
            valid = r["curve"]["valid"]
            if valid:
                axes[1].plot(*zip(*valid), color=f"C{i}", marker=".",
                             linestyle="-" if r["seed"] == 1 else ":",
                             label=model if r["seed"] == min(x["seed"] for x in by_model[model]) else None)
    axes[1].set_xlabel("updates")
    axes[1].set_ylabel("validation perplexity")
    axes[1].set_title("validation perplexity per epoch", fontsize=10)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(RESULTS, "capacity.png")
    fig.savefig(path, dpi=110)
    say(f"wrote {path}")


# ---- Command line -------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--stage", choices=("pilots", "family"), default="family")
    parser.add_argument("--runs", help="MODEL:SEED,... (family only; default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each (default 2)")
    parser.add_argument("--report", action="store_true", help="only write the tables and the plot")
    parser.add_argument("--redo", action="store_true", help="train the given runs again from scratch")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    pilots = tools.load_json(results_path("pilots"), {"runs": []})
    if args.stage == "pilots":
        if args.runs:
            parser.error("--runs is for the family; the pilots are 4xlstm at each of "
                         f"{PILOT_WIDTHS}, seed 1")
        wanted = [("4xlstm", w, 1) for w in PILOT_WIDTHS]
    else:
        width, why = choose_width(pilots)
        if width is None and not args.report:
            parser.error(f"the family's width comes from the pilots ({why}): run --stage pilots first")
        wanted = []
        for item in (args.runs.split(",") if args.runs else []):
            model, _, seed = item.partition(":")
            if model not in FAMILY or not seed.isdigit():
                parser.error(f"bad run {item!r}: give MODEL:SEED with MODEL one of {', '.join(FAMILY)}")
            wanted.append((model, width, int(seed)))
        if not args.runs:
            wanted = [(m, width, s) for s in SEEDS for m in FAMILY]
        if width is not None:
            say(f"width {width} by the declared rule: {why}")
    if not args.report:
        prepare_data()
        path = results_path(args.stage)
        results = tools.load_json(path, {"runs": []})
        if args.stage == "family":  # the pilot at the chosen width is the family's 4xLSTM seed 1
            have = {(x["model"], x["width"], x["seed"]) for x in results["runs"]}
            for r in pilots["runs"]:
                key = (r["model"], r["width"], r["seed"])
                if key in wanted and key not in have:
                    results["runs"].append(dict(r, from_pilot=True))
            tools.save_json(results, path)
        done = set() if args.redo else {(r["model"], r["width"], r["seed"]) for r in results["runs"]}
        todo = [run for run in wanted if run not in done]
        if args.redo:
            for model, width, seed in todo:
                shutil.rmtree(os.path.join(WORK, run_name(model, width, seed)), ignore_errors=True)
        say(f"{len(wanted) - len(todo)} of {len(wanted)} runs already have results; {len(todo)} to go "
            f"({args.jobs} at a time, logs in {WORK})")
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(train_and_evaluate, m, w, s, EPOCHS): (m, w, s) for m, w, s in todo}
            for future in concurrent.futures.as_completed(futures):
                model, width, seed = futures[future]
                try:
                    result = future.result()
                except RuntimeError as error:
                    say(f"{model} width {width} seed {seed} failed: {error}")
                    continue
                results = tools.load_json(path, {"runs": []})
                results["runs"] = [r for r in results["runs"]
                                   if (r["model"], r["width"], r["seed"]) != (model, width, seed)]
                results["runs"].append(result)
                tools.save_json(results, path)
                say(f"{model} width {width} seed {seed}: train {result['train_ppl']:.2f}, valid "
                    f"{result['valid_ppl']:.2f}, test {result['test_ppl']:.2f} ({result['wall_s']} s)")
        if args.stage == "pilots":
            width, why = choose_width(tools.load_json(path, {"runs": []}))
            say(f"the declared rule gives width {width}: {why}" if width else why)
    report(args.stage)


if __name__ == "__main__":
    sys.exit(main())
