#!/usr/bin/env python3
"""Multi30k En→De to convergence on CPU: the LSTM-MoE model against its no-MoE twin.

Both models are the lstm_moe_nmt layout at CPU size: 256-dim shared embeddings, a bidirectional
first encoder layer, 3 encoder and 2 decoder residual LSTMs of 256 units, separable attention,
dropout 0.3, label smoothing 0.1, 4000 tokens a batch. They differ only in the MoE layers:

    moe        two MoE layers (encoder layers 2-3, decoder layers 1-2), 8 experts 256→512→256,
               k = 2, strictly balanced gating (App. F), w_importance = w_load = 0.01
    baseline   the same network with both MoE layers removed (lstm_moe_nmt_baseline)

Each model trains with seeds 1, 2 and 3 (--seeds), until greedy validation BLEU (logged every epoch)
has not improved for --patience epochs (at most --max-epoch). Each run's checkpoint is then
chosen on validation only: beam 5 on the validation set with checkpoint_best.pt and with the
average of the last epoch checkpoints (up to 5, ending at the best epoch), the better one decodes
test2016 with beam 5. Results go to examples/translation/results/: each run's hypotheses
(MODEL.seedN.hyp: one line per test sentence in test order, BPE removed, lower-cased tokenized
like data/multi30k/tok), multi30k.json (BLEU and what was chosen, per run), multi30k.md (mean ±
half range over seeds, and per run) and multi30k_curves.png. MODEL.hyp, the file that stands for
a model, is a copy of its seed with the better beam-5 validation BLEU (never looked at on test);
the means and that choice take only the seeds every model has finished.

    .venv/bin/python examples/translation/multi30k_results.py            # everything
    .venv/bin/python examples/translation/multi30k_results.py --models moe --seeds 2
    .venv/bin/python examples/translation/multi30k_results.py --redo --models moe --seeds 2
    .venv/bin/python examples/translation/multi30k_results.py --report   # tables + plot only

It resumes where it stopped: a run with a result in multi30k.json is not trained again (--redo
trains it again from a cleared work directory; the old result stays until the new one is in),
a run that --max-epoch stopped before its validation plateau trains on when --max-epoch is raised,
training continues from checkpoint_last.pt in outputs/multi30k_results/MODEL.seedN/
(git-ignored; runs of before --seeds, in outputs/multi30k_results/MODEL/, are not picked up),
finished stages are skipped. Runs go two at a time (--jobs), one thread each.
"""

import argparse
import concurrent.futures
import fcntl
import itertools
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
DATA = os.path.join(ROOT, "outputs", "data", "multi30k.en-de", "bin")
REFERENCE = os.path.join(ROOT, "outputs", "data", "multi30k.en-de", "tok", "test.de")
WORK = os.path.join(ROOT, "outputs", "multi30k_results")
RESULTS = os.path.join(ROOT, "examples", "translation", "results")
RESULTS_JSON = os.path.join(RESULTS, "multi30k.json")
# The hypotheses of each run, and per model those of the seed best on validation (report()).
RUN_HYP = os.path.join(RESULTS, "multi30k.en-de.test2016.{model}.seed{seed}.hyp")
HYP = os.path.join(RESULTS, "multi30k.en-de.test2016.{model}.hyp")

SHARED = ["--encoder-embed-dim", "256", "--encoder-hidden-size", "256", "--attention-dim", "256",
          "--share-all-embeddings", "--dropout", "0.3"]
MODELS = {
    "moe": ["--arch", "lstm_moe_nmt", *SHARED, "--moe-num-experts", "8", "--moe-k", "2",
            "--moe-hidden-dim", "512"],
    "baseline": ["--arch", "lstm_moe_nmt_baseline", *SHARED],
}
AVERAGE_LAST = 5
DEFAULT_MAX_EPOCH = 60
DEFAULT_PATIENCE = 5


def say(message):
    tools.say("multi30k_results", message)


def run_logged(cmd, log_path, threads, mode="a"):
    """``cmd`` with ``threads`` intra-op threads (--threads), its output to ``log_path``."""
    tools.run_logged(cmd, log_path, ROOT, mode, threads)


def work_dir(model, seed):
    return os.path.join(WORK, f"{model}.seed{seed}")


def train(model, seed, max_epoch, patience, threads):
    work = work_dir(model, seed)
    done = os.path.join(work, "train.done")
    if os.path.exists(done):
        return
    os.makedirs(work, exist_ok=True)
    say(f"{model} seed {seed}: training (log {os.path.join(work, 'train.log')})")
    run_logged([os.path.join(BIN, "fairseq-train"), DATA, "--user-dir", "fairseq_smoe",
                "--task", "translation", "--cpu", *MODELS[model],
                "--criterion", "smoe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
                "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--clip-norm", "1.0",
                "--lr", "0.003", "--lr-scheduler", "warmup_hold_inverse_sqrt",
                "--warmup-updates", "100", "--hold-updates", "600", "--max-tokens", "4000",
                "--max-epoch", str(max_epoch), "--patience", str(patience),
                "--eval-bleu", "--eval-bleu-args", '{"beam": 1, "max_len_a": 1.2, "max_len_b": 10}',
                "--eval-bleu-remove-bpe", "--best-checkpoint-metric", "bleu",
                "--maximize-best-checkpoint-metric",
                # enough epoch files for the average ending at the best epoch, --patience later
                "--keep-last-epochs", str(max(2 * AVERAGE_LAST, patience + AVERAGE_LAST)),
                "--save-dir", os.path.join(work, "checkpoints"), "--num-workers", "0",
                "--log-format", "simple", "--log-interval", "20", "--seed", str(seed)],
               os.path.join(work, "train.log"), threads)
    with open(done, "w") as f:
        f.write(time.strftime("%Y-%m-%d %H:%M:%S\n"))


def validations(work):
    """[(epoch, valid loss, greedy valid BLEU)] from the training log in ``work``, one per epoch."""
    found = {}
    log = os.path.join(work, "train.log")
    if os.path.exists(log):
        with open(log) as f:
            for line in f:
                m = re.search(r"\| valid \| epoch (\d+) \| valid on 'valid' subset \| loss ([\d.]+) "
                              r"\|.*\| bleu ([\d.]+) \|", line)
                if m:  # a resumed run repeats no epoch, but keep the last line per epoch
                    found[int(m.group(1))] = (float(m.group(2)), float(m.group(3)))
    return [(epoch, *found[epoch]) for epoch in sorted(found)]


def generate(work, checkpoint, split, threads, beam=5):
    """Beam search over ``split``; (hypotheses in input order, fairseq's tokenized BLEU4)."""
    log = os.path.join(work, f"generate-{split}-{os.path.basename(checkpoint)}.txt")
    run_logged([os.path.join(BIN, "fairseq-generate"), DATA, "--user-dir", "fairseq_smoe", "--cpu",
                "--path", checkpoint, "--gen-subset", split, "--beam", str(beam),
                "--batch-size", "64", "--required-batch-size-multiple", "1", "--remove-bpe"],
               log, threads, mode="w")
    hypotheses = {}
    with open(log) as f:
        text = f.read()
    for m in re.finditer(r"^H-(\d+)\t[^\t]*\t(.*)$", text, re.M):
        hypotheses[int(m.group(1))] = m.group(2)
    bleu = float(re.findall(r"BLEU4 = ([\d.]+)", text)[-1])
    return [hypotheses[i] for i in range(len(hypotheses))], bleu


def sacrebleu_score(hypotheses, reference_path):
    import sacrebleu

    with open(reference_path) as f:
        references = [line.rstrip("\n") for line in f]
    if len(references) != len(hypotheses):
        raise RuntimeError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    return sacrebleu.corpus_bleu(hypotheses, [references]).score


def evaluate(model, seed, threads, max_epoch, patience):
    """Choose best or averaged on validation (beam 5), decode test2016 with it."""
    work = work_dir(model, seed)
    checkpoints = os.path.join(work, "checkpoints")
    epochs = validations(work)
    best_epoch = max(epochs, key=lambda e: (e[2], -e[0]))[0]
    window = [e for e in range(best_epoch - AVERAGE_LAST + 1, best_epoch + 1) if e >= 1
              and os.path.exists(os.path.join(checkpoints, f"checkpoint{e}.pt"))]
    candidates = {"checkpoint_best.pt": os.path.join(checkpoints, "checkpoint_best.pt")}
    if len(window) > 1:
        average = os.path.join(checkpoints, f"average{window[0]}-{window[-1]}.pt")
        if not os.path.exists(average):
            say(f"{model} seed {seed}: averaging epochs {window[0]}-{window[-1]}")
            run_logged([os.path.join(BIN, "python"),
                        os.path.join(ROOT, "scripts", "average_checkpoints.py"),
                        *[os.path.join(checkpoints, f"checkpoint{e}.pt") for e in window],
                        "-o", average], os.path.join(work, "average.log"), threads, mode="w")
        candidates[os.path.basename(average)] = average
    else:  # the epoch checkpoints before the best are gone (a --patience past --keep-last-epochs)
        say(f"{model} seed {seed}: no epoch checkpoints before the best one left to average; using the best")
        window = [best_epoch]
    valid_bleu = {}
    for name, path in candidates.items():
        say(f"{model} seed {seed}: beam 5 on valid with {name}")
        valid_bleu[name] = generate(work, path, "valid", threads)[1]
    chosen = max(valid_bleu, key=valid_bleu.get)
    say(f"{model} seed {seed}: beam 5 on test2016 with {chosen}")
    hypotheses, test_bleu = generate(work, candidates[chosen], "test", threads)
    os.makedirs(RESULTS, exist_ok=True)
    with open(RUN_HYP.format(model=model, seed=seed), "w") as f:
        f.write("".join(h + "\n" for h in hypotheses))
    with open(os.path.join(work, "train.log")) as f:
        log = f.read()
    # fairseq counts "shared" and "expert" parameters apart (its MoE bookkeeping; ours are
    # shared to it): their sum is the model's size.
    counts = re.findall(r"num\. (?:shared|expert) model params: ([\d,]+)", log)[:2]
    return {"model": model, "seed": seed, "args": MODELS[model], "epochs_trained": epochs[-1][0],
            "best_epoch": best_epoch, "max_epoch": max_epoch, "patience": patience,
            "averaged_epochs": [window[0], window[-1]],
            "valid_bleu_beam5": valid_bleu, "chosen": chosen,
            "test2016_bleu_tokenized": test_bleu,
            "test2016_sacrebleu": round(sacrebleu_score(hypotheses, REFERENCE), 2),
            "params": sum(int(n.replace(",", "")) for n in counts) if counts else None,
            "train_wall_s": tools.training_wall(log),
            "curve": [{"epoch": e, "valid_loss": loss, "valid_bleu_greedy": b} for e, loss, b in epochs],
            "train_curve": [[round(x, 3), loss] for x, loss in training_curve(work)]}


def load_results():
    return tools.load_json(RESULTS_JSON, {"runs": []})


def save_result(result):
    # Both models' threads (or two runs of this script, one per model) write the one file.
    os.makedirs(RESULTS, exist_ok=True)
    with open(RESULTS_JSON + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _save_result(result)


def run_key(result):
    """(model, seed) of a result."""
    if "seed" not in result:
        raise RuntimeError(f"a {result['model']} result in {RESULTS_JSON} has no \"seed\" (it is from "
                           "before --seeds): add \"seed\": 1 to it, or delete it to train it again")
    return result["model"], result["seed"]


def _save_result(result):
    results = load_results()
    results["runs"] = [r for r in results["runs"] if run_key(r) != run_key(result)] + [result]
    results["runs"].sort(key=lambda r: (list(MODELS).index(r["model"]), run_key(r)[1]))
    tools.save_json(results, RESULTS_JSON)


def training_curve(work):
    """[(epoch + fraction, training loss)] from the log intervals in ``work``."""
    points = []
    log = os.path.join(work, "train.log")
    if os.path.exists(log):
        with open(log) as f:
            for line in f:
                m = re.search(r"train_inner \| epoch (\d+): +(\d+) / (\d+) loss=([\d.]+),", line)
                if m:
                    epoch, step, total = int(m.group(1)), int(m.group(2)), int(m.group(3))
                    points.append((epoch - 1 + step / total, float(m.group(4))))
    return points


def curves(work, result):
    """(training loss points, per-epoch validations) to plot: a finished run's from the results
    file, which is committed (the work directory and its logs are not), else from the log in
    ``work`` of a run in progress. The results of runs before the training curve was kept have none."""
    if result is None:
        return training_curve(work), validations(work)
    return ([tuple(point) for point in result.get("train_curve", [])],
            [(c["epoch"], c["valid_loss"], c["valid_bleu_greedy"]) for c in result["curve"]])


def cut_by_max_epoch(result, patience):
    """Whether a run ended at --max-epoch with fewer than --patience epochs since its best one,
    that is before its validation plateau (results from before "patience" was kept: ``patience``)."""
    return result["epochs_trained"] - result["best_epoch"] < result.get("patience", patience)


def chosen_valid_bleu(result):
    """Beam-5 validation BLEU of the checkpoint a run decoded test2016 with."""
    return result["valid_bleu_beam5"][result["chosen"]]


def best_on_validation(runs):
    """The run whose chosen checkpoint has the best beam-5 validation BLEU (the lower seed on a tie):
    its hypotheses stand for the model, a choice that never looks at test2016."""
    return max(runs, key=lambda r: (chosen_valid_bleu(r), -run_key(r)[1]))


def report():
    results = load_results()
    by_model = {}
    for r in results["runs"]:
        by_model.setdefault(r["model"], []).append(r)
    # The models are compared over the seeds every one of them has finished, so that a seed run
    # for one model first (the runs of a seed may land in different sessions) cannot tip the
    # means or the choice of MODEL.hyp before its twin is in.
    seed_sets = [{run_key(r)[1] for r in runs} for runs in by_model.values()]
    compared = set.intersection(*seed_sets) if seed_sets else set()
    compared = compared or set.union(set(), *seed_sets)
    waiting = {model: [run_key(r)[1] for r in runs if run_key(r)[1] not in compared]
               for model, runs in by_model.items()}
    by_model = {model: [r for r in runs if run_key(r)[1] in compared] for model, runs in by_model.items()}
    lines = ["Mean ± half range over the seeds, then each run:", "",
             "| model | seeds | test2016 BLEU, tokenized | sacreBLEU | valid BLEU, beam 5 | "
             + os.path.basename(HYP).replace("{model}", "MODEL") + " |",
             "|---|---|---|---|---|---|"]
    for model, runs in by_model.items():
        chosen = best_on_validation(runs)
        hypotheses = RUN_HYP.format(model=model, seed=run_key(chosen)[1])
        if os.path.exists(hypotheses):
            shutil.copyfile(hypotheses, HYP.format(model=model))
        else:  # e.g. a results file copied from another checkout without its .hyp files
            say(f"{model}: {hypotheses} is missing, so {HYP.format(model=model)} is left as it is; "
                f"--redo --models {model} --seeds {run_key(chosen)[1]} trains and decodes that run again")
        lines.append(f"| {model} | {','.join(str(run_key(r)[1]) for r in runs)} | "
                     f"**{tools.mean_and_half_range([r['test2016_bleu_tokenized'] for r in runs])}** | "
                     f"{tools.mean_and_half_range([r['test2016_sacrebleu'] for r in runs])} | "
                     f"{tools.mean_and_half_range([chosen_valid_bleu(r) for r in runs])} | "
                     f"seed {run_key(chosen)[1]}'s (best valid BLEU) |")
    waiting = [f"{model} seed {', '.join(map(str, seeds))}" for model, seeds in waiting.items() if seeds]
    if waiting:
        lines += ["", f"Left out of the means and of MODEL.hyp until every model has the seed: "
                  f"{'; '.join(waiting)}."]
    lines += ["", "| model | seed | parameters | epochs (best) | checkpoint | valid BLEU, beam 5 | "
              "test2016 BLEU (tokenized) | sacreBLEU | training wall |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        params = f"{r['params'] / 1e6:.1f}M" if r.get("params") else "-"
        wall = f"{r['train_wall_s'] / 60:.0f} min" if r.get("train_wall_s") else "-"
        cut = ", cut by --max-epoch" if cut_by_max_epoch(r, DEFAULT_PATIENCE) else ""
        lines.append(f"| {r['model']} | {run_key(r)[1]} | {params} | {r['epochs_trained']} "
                     f"({r['best_epoch']}){cut} | {r['chosen']} | {chosen_valid_bleu(r):.2f} | "
                     f"**{r['test2016_bleu_tokenized']:.2f}** | {r['test2016_sacrebleu']:.2f} | "
                     f"{wall} |")
    tools.write_table(lines, os.path.join(RESULTS, "multi30k.md"))
    plot(results)


def plot(results):
    """Loss and greedy validation BLEU per epoch: a colour per model, a line style per seed; runs
    still training are drawn from their logs."""
    plt = tools.pyplot("multi30k_results")
    if plt is None:
        return
    finished = {run_key(r): r for r in results["runs"]}
    unfinished = {run: label for run, label in work_dirs().items() if run not in finished}
    seeds = sorted({seed for _, seed in finished} | {seed for _, seed in unfinished})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for color, model in zip(("C0", "C1"), MODELS):
        for style, seed in zip(itertools.cycle(("-", "--", ":", "-.")), seeds):
            train, valid = curves(work_dir(model, seed), finished.get((model, seed)))
            name = f"{model} seed {seed}" + unfinished.get((model, seed), "")
            if train:
                axes[0].plot(*zip(*train), color=color, linestyle=style, alpha=0.4, linewidth=0.8,
                             label=f"{name} train")
            if valid:
                epochs = [e for e, _, _ in valid]
                axes[0].plot(epochs, [loss for _, loss, _ in valid], color=color, linestyle=style,
                             marker="o", markersize=3, label=f"{name} valid")
                axes[1].plot(epochs, [b for _, _, b in valid], color=color, linestyle=style,
                             marker="o", markersize=3, label=name)
    axes[0].set_title("loss (label-smoothed, base 2)")
    axes[1].set_title("validation BLEU, greedy (per epoch; axis from 20)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    axes[0].set_ylim(top=8)
    axes[1].set_ylim(bottom=20)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "multi30k_curves.png"), dpi=110)
    say(f"wrote {os.path.join(RESULTS, 'multi30k_curves.png')}")


def work_dirs():
    """{(model, seed): what its legend says of a run without a result} for the work directories
    under WORK."""
    found = {}
    for name in sorted(os.listdir(WORK)) if os.path.isdir(WORK) else []:
        model, _, seed = name.partition(".seed")
        if model in MODELS and seed.isdigit():
            trained = os.path.exists(os.path.join(WORK, name, "train.done"))
            found[(model, int(seed))] = " (not evaluated)" if trained else " (training)"
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, of {', '.join(MODELS)} (default: both)")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated training seeds (default 1,2,3)")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (default 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads per job (default 1; e.g. 2 for one model alone)")
    parser.add_argument("--max-epoch", type=int, default=DEFAULT_MAX_EPOCH,
                        help=f"at most this many epochs ({DEFAULT_MAX_EPOCH}); raising it trains on "
                             "the runs it stopped before their validation plateau")
    parser.add_argument("--patience", type=int, default=DEFAULT_PATIENCE,
                        help="stop after this many epochs without a better validation BLEU "
                             f"({DEFAULT_PATIENCE})")
    parser.add_argument("--report", action="store_true", help="only write the tables and the plot")
    parser.add_argument("--redo", action="store_true",
                        help="train the runs again from scratch even where they have a result "
                             "(their work directories are cleared; the old result stays until "
                             "the new one is in)")
    args = parser.parse_args(argv)
    models = list(dict.fromkeys(args.models.split(",")))
    for model in models:
        if model not in MODELS:
            parser.error(f"unknown model {model!r}: choose from {', '.join(MODELS)}")
    seeds = list(dict.fromkeys(args.seeds.split(",")))
    if not all(seed.isdigit() for seed in seeds):
        parser.error(f"--seeds {args.seeds!r}: give whole numbers >= 0 separated by commas, e.g. 1,2")
    if args.jobs < 1 or args.threads < 1 or args.max_epoch < 1 or args.patience < 1:
        parser.error("--jobs, --threads, --max-epoch and --patience must be >= 1")
    failed = []
    if not args.report:
        say("preparing Multi30k (scripts/prepare-multi30k.sh; skipped when done)")
        subprocess.run(["bash", os.path.join(ROOT, "scripts", "prepare-multi30k.sh"), "--pair", "en-de"],
                       cwd=ROOT, check=True)
        runs = [(model, int(seed)) for seed in seeds for model in models]
        failed = train_and_evaluate(runs, args)
    report()
    return 1 if failed else 0


def train_and_evaluate(runs, args):
    """Train and evaluate the ``runs`` [(model, seed)] without a result (all with --redo),
    ``args.jobs`` at a time; the runs that failed, each reported with the end of its log."""
    finished = {} if args.redo else {run_key(r): r for r in load_results()["runs"]}
    todo = [run for run in runs if run not in finished or trains_on(finished[run], args)]
    for model, seed in runs:
        if (model, seed) not in todo:
            say(f"{model} seed {seed}: has a result in {RESULTS_JSON}; not trained again (--redo would)")
    if args.redo:
        for model, seed in todo:
            shutil.rmtree(work_dir(model, seed), ignore_errors=True)

    def run(model, seed):
        train(model, seed, args.max_epoch, args.patience, args.threads)
        result = evaluate(model, seed, args.threads, args.max_epoch, args.patience)
        save_result(result)
        say(f"{model} seed {seed}: test2016 BLEU {result['test2016_bleu_tokenized']:.2f} "
            f"(tokenized), sacreBLEU {result['test2016_sacrebleu']:.2f}, with {result['chosen']}")

    failed = []
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run, model, seed): (model, seed) for model, seed in todo}
        for future in concurrent.futures.as_completed(futures):
            model, seed = futures[future]
            try:
                future.result()
            except RuntimeError as error:
                say(f"{model} seed {seed} failed: {error}")
                failed.append((model, seed))
    return failed


def trains_on(result, args):
    """Whether a finished run that --max-epoch cut before its plateau goes on training (from its
    checkpoint_last.pt, its result replaced when it has a new one), saying why or why not."""
    if not cut_by_max_epoch(result, args.patience):
        return False
    model, seed = run_key(result)
    cut = (f"{model} seed {seed}: stopped at epoch {result['epochs_trained']} (--max-epoch), "
           f"{result['epochs_trained'] - result['best_epoch']} after its best, before its plateau")
    if args.max_epoch <= result["epochs_trained"]:
        say(f"{cut}; a --max-epoch above {result['epochs_trained']} trains it on")
        return False
    work = work_dir(model, seed)
    if not os.path.exists(os.path.join(work, "checkpoints", "checkpoint_last.pt")):
        say(f"{cut}; its checkpoint_last.pt is gone with {work}, so it cannot train on "
            f"(--redo --models {model} --seeds {seed} trains it again from scratch)")
        return False
    say(f"{cut}: training on to --max-epoch {args.max_epoch} from its checkpoint_last.pt")
    if os.path.exists(os.path.join(work, "train.done")):
        os.remove(os.path.join(work, "train.done"))
    return True


if __name__ == "__main__":
    sys.exit(main())
