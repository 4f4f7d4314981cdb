#!/usr/bin/env python3
"""WikiText-2 at CPU scale: the shape of the paper's Table 7 and the Table 6 ablation.

At one active compute budget (the demo's width 256: embedding 256 → LSTM → [layer] → LSTM →
adaptive softmax, residual + dropout 0.1, 2048 tokens a batch), each model trains for the same
number of tokens (``--epochs`` full epochs, default 2) with two seeds:

    moe-4, moe-16, moe-64   MoE layers of 4/16/64 experts (256→512→256), noisy top-2, w = 0.1
    moe-1-wide              one expert of hidden size 1024 (= the active compute of 2 × 512)
    4xlstm                  no MoE; two LSTMs below and two above (a 256-LSTM costs about what
                            two 256→512→256 experts cost per token: App. C's matched baseline)
    moe-16-w0               moe-16 without the balance losses (w_importance = w_load = 0)

Each run: fairseq-train (validation every epoch, checkpoint_best.pt kept), then fairseq-eval-lm
of checkpoint_best.pt on the full validation and test sets. Results are appended to
examples/language_model/results/wikitext2.json as they arrive; the table (mean ± half range over
the seeds) goes to results/wikitext2.md and the learning curves to results/wikitext2_curves.png.

    .venv/bin/python examples/language_model/wikitext2_family.py            # everything
    .venv/bin/python examples/language_model/wikitext2_family.py --runs moe-16:1,4xlstm:1
    .venv/bin/python examples/language_model/wikitext2_family.py --report   # table + plot only
    .venv/bin/python examples/language_model/wikitext2_family.py --redo --runs moe-4:1  # train again

It resumes where it stopped: a run with a result is skipped, an interrupted one continues from
its checkpoint_last.pt (fairseq's resume) in outputs/wikitext2_family/RUN/ (git-ignored). Two
runs go side by side (--jobs), one thread each.
"""

import argparse
import concurrent.futures
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import experiment_tools as tools  # noqa: E402

BIN = os.path.join(ROOT, ".venv", "bin")
DATA = os.path.join(ROOT, "outputs", "data", "wikitext-2", "bin")
WORK = os.path.join(ROOT, "outputs", "wikitext2_family")
RESULTS = os.path.join(ROOT, "examples", "language_model", "results")
RESULTS_JSON = os.path.join(RESULTS, "wikitext2.json")

MODELS = {
    "moe-4": ["--moe-num-experts", "4"],
    "moe-16": ["--moe-num-experts", "16"],
    "moe-64": ["--moe-num-experts", "64"],
    "moe-1-wide": ["--moe-num-experts", "1", "--moe-k", "1", "--moe-hidden-dim", "1024"],
    "4xlstm": ["--moe-num-experts", "0", "--lstm-layers-before-moe", "2",
               "--lstm-layers-after-moe", "2"],
    "moe-16-w0": ["--moe-num-experts", "16", "--moe-w-importance", "0", "--moe-w-load", "0"],
}
# Most informative first: the default MoE and its matched baseline, then the rest of the family.
ORDER = ["moe-16", "4xlstm", "moe-4", "moe-64", "moe-1-wide", "moe-16-w0"]
SEEDS = (1, 2)


def say(message):
    tools.say("wikitext2_family", message)


def load_results():
    return tools.load_json(RESULTS_JSON, {"runs": []})


def save_results(results):
    results["runs"].sort(key=lambda r: (ORDER.index(r["model"]), r["seed"]))
    tools.save_json(results, RESULTS_JSON)


def run_logged(cmd, log_path):
    tools.run_logged(cmd, log_path, ROOT)


def train_and_evaluate(model, seed, epochs):
    name = f"{model}.seed{seed}"
    work = os.path.join(WORK, name)
    os.makedirs(work, exist_ok=True)
    train_log = os.path.join(work, "train.log")
    run_logged([os.path.join(BIN, "fairseq-train"), DATA, "--user-dir", "fairseq_smoe",
                "--task", "language_modeling", "--arch", "lstm_moe_lm_wikitext2_demo",
                "--criterion", "smoe_cross_entropy", *MODELS[model],
                "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "0.004",
                "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "50",
                "--warmup-init-lr", "1e-7", "--clip-norm", "1.0", "--tokens-per-sample", "64",
                "--sample-break-mode", "none", "--max-tokens", "2048", "--max-epoch", str(epochs),
                "--cpu", "--num-workers", "0", "--seed", str(seed), "--log-format", "simple",
                "--log-interval", "50", "--save-dir", os.path.join(work, "checkpoints"),
                "--no-epoch-checkpoints"], train_log)
    evaluation_started = time.time()
    ppl = {}
    for split in ("valid", "test"):
        log = os.path.join(work, f"eval-{split}.log")
        if os.path.exists(log):
            os.remove(log)
        run_logged([os.path.join(BIN, "fairseq-eval-lm"), DATA, "--user-dir", "fairseq_smoe",
                    "--path", os.path.join(work, "checkpoints", "checkpoint_best.pt"),
                    "--gen-subset", split, "--tokens-per-sample", "64", "--max-tokens", "8192",
                    "--cpu"], log)
        ppl[split], ppl[split + "_tokens"] = tools.eval_lm_result(log)
    with open(train_log) as f:
        log_text = f.read()
    stats = tools.last_train_stats(log_text)
    result = {"model": model, "seed": seed, "valid_ppl": ppl["valid"], "test_ppl": ppl["test"],
              "valid_tokens": ppl["valid_tokens"], "test_tokens": ppl["test_tokens"],
              "tokens": int(float(stats.get("num_updates", 0))) * 2048,
              "updates": int(float(stats.get("num_updates", 0))), "epochs": epochs,
              "train_ppl_last_epoch": float(stats.get("ppl", "nan")),
              # training summed over resumes (fairseq's clock restarts in each), then evaluation
              "wall_s": (tools.training_wall(log_text) or 0) + round(time.time() - evaluation_started)}
    for key in ("moe_cv_imp", "moe_cv_load", "moe_max_load", "moe_min_load", "moe_dead"):
        if key in stats:
            result[key + "_last_epoch"] = float(stats[key])
    # The curves go into the committed results file: the work directory does not outlive a checkout.
    train, valid = curves(train_log)
    result["curve"] = {"train": train, "valid": valid}
    return result


def curves(log_path):
    """(tokens, training perplexity) every log interval and (tokens, validation perplexity)."""
    return tools.learning_curves(log_path, per_update=2048)


def report(results):
    by_model = {}
    for r in results["runs"]:
        by_model.setdefault(r["model"], []).append(r)
    lines = ["| model | seeds | test ppl (mean ± half range) | valid ppl | CV(Importance) | "
             "CV(Load) | max/mean load | tokens |", "|---|---|---|---|---|---|---|---|"]
    for model in ORDER:
        runs = by_model.get(model, [])
        if not runs:
            continue

        def spread(key, runs=runs):
            return tools.mean_and_half_range([r[key] for r in runs if key in r])

        lines.append(f"| {model} | {','.join(str(r['seed']) for r in runs)} | {spread('test_ppl')} | "
                     f"{spread('valid_ppl')} | {spread('moe_cv_imp_last_epoch')} | "
                     f"{spread('moe_cv_load_last_epoch')} | {spread('moe_max_load_last_epoch')} | "
                     f"{runs[0]['tokens']:,} |")
    lines += ["", "| model | seed | valid ppl | test ppl | CV(Importance) | CV(Load) | max/mean load | "
              "idle experts a batch | wall |", "|---|---|---|---|---|---|---|---|---|"]
    for model in ORDER:
        for r in by_model.get(model, []):
            stats = [f"{r[key]:.3f}" if key in r else "-" for key in
                     ("moe_cv_imp_last_epoch", "moe_cv_load_last_epoch", "moe_max_load_last_epoch")]
            idle = f"{r['moe_dead_last_epoch']:.2f}" if "moe_dead_last_epoch" in r else "-"
            lines.append(f"| {model} | {r['seed']} | {r['valid_ppl']:.2f} | {r['test_ppl']:.2f} | "
                         f"{' | '.join(stats)} | {idle} | {r.get('wall_s', '-')} s |")
    tools.write_table(lines, os.path.join(RESULTS, "wikitext2.md"))
    plt = tools.pyplot("wikitext2_family")
    if plt is None:
        return
    # One colour per model, seed 1 solid and seed 2 dashed; the middle panel zooms into the
    # second epoch, where the models separate, with the training perplexity averaged over 10
    # log intervals (500 updates) so that the batch-to-batch noise does not hide the gaps.
    window = 10
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    colours = {model: f"C{i}" for i, model in enumerate(ORDER)}
    without_curve = []
    for r in results["runs"]:
        log = os.path.join(WORK, f"{r['model']}.seed{r['seed']}", "train.log")
        if "curve" in r:
            train, valid = r["curve"]["train"], r["curve"]["valid"]
        else:  # a run from before the curves were kept in the results file: its log if complete
            train, valid = curves(log) if os.path.exists(log) else ([], [])
            # (a log that stops short is an interrupted --redo of the run, not this result)
            if not valid or valid[-1][0] != r["tokens"]:
                without_curve.append(f"{r['model']}:{r['seed']}")
                continue
        style = {"color": colours[r["model"]], "linestyle": "-" if r["seed"] % 2 else "--",
                 "label": f"{r['model']} s{r['seed']}"}
        if train:
            axes[0].plot(*zip(*train), linewidth=0.8, **style)
            half = [point for point in train if point[0] > train[-1][0] / 2]
            smooth = [(half[i + window - 1][0], statistics.mean(p for _, p in half[i:i + window]))
                      for i in range(len(half) - window + 1)]
            if smooth:
                axes[1].plot(*zip(*smooth), linewidth=1.2, **style)
        if valid:
            axes[2].plot(*zip(*valid), marker="o", **style)
    titles = ("training perplexity", "training perplexity, 2nd half (mean of 500 updates)",
              "validation perplexity (per epoch)")
    for ax, title in zip(axes, titles):
        ax.set_xlabel("training tokens")
        ax.set_title(title, fontsize=10)
        if ax.lines:
            ax.legend(fontsize=6, ncol=2)
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "wikitext2_curves.png"), dpi=110)
    say(f"wrote {os.path.join(RESULTS, 'wikitext2_curves.png')}"
        + (f"; no curve kept for {', '.join(without_curve)}" if without_curve else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--runs", help="MODEL:SEED,... (default: every model of ORDER, seeds 1 and 2)")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (default 2)")
    parser.add_argument("--epochs", type=int, default=2, help="full epochs per run (default 2)")
    parser.add_argument("--report", action="store_true", help="only write the table and the plot")
    parser.add_argument("--redo", action="store_true",
                        help="train the runs again from scratch even where they have a result "
                             "(their work directories are cleared; the old result stays until "
                             "the new one is in)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.epochs < 1:
        parser.error("--jobs and --epochs must be >= 1")
    if args.runs:
        wanted = []
        for item in args.runs.split(","):
            model, _, seed = item.partition(":")
            if model not in MODELS or not seed.isdigit():
                parser.error(f"bad run {item!r}: give MODEL:SEED with MODEL one of {', '.join(ORDER)}")
            wanted.append((model, int(seed)))
    else:
        wanted = [(m, s) for s in SEEDS for m in ORDER]
    results = load_results()
    if not args.report:
        if not os.path.exists(os.path.join(DATA, "dict.txt")):
            say("preparing WikiText-2 (scripts/prepare-wikitext2.sh)")
            subprocess.run(["bash", os.path.join(ROOT, "scripts", "prepare-wikitext2.sh")], cwd=ROOT,
                           check=True)
        done = set() if args.redo else {(r["model"], r["seed"]) for r in results["runs"]}
        todo = [(m, s) for m, s in wanted if (m, s) not in done]
        if args.redo:
            for model, seed in todo:
                shutil.rmtree(os.path.join(WORK, f"{model}.seed{seed}"), ignore_errors=True)
        say(f"{len(wanted) - len(todo)} of {len(wanted)} runs already have results; {len(todo)} to go "
            f"({args.jobs} at a time, logs in {WORK})")
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(train_and_evaluate, m, s, args.epochs): (m, s) for m, s in todo}
            for future in concurrent.futures.as_completed(futures):
                model, seed = futures[future]
                try:
                    result = future.result()
                except RuntimeError as error:
                    say(f"{model} seed {seed} failed: {error}")
                    continue
                results = load_results()
                results["runs"] = [r for r in results["runs"] if (r["model"], r["seed"]) != (model, seed)]
                results["runs"].append(result)
                save_results(results)
                say(f"{model} seed {seed}: valid ppl {result['valid_ppl']:.2f}, test ppl "
                    f"{result['test_ppl']:.2f} ({result['wall_s']} s)")
    report(load_results())


if __name__ == "__main__":
    sys.exit(main())
