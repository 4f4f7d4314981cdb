#!/usr/bin/env python3
"""A capacity benchmark: at equal compute per token, do more experts store more facts?

The task: every line of the corpus is one fact ``k1 k2 attr value``: two keys from a shared key
vocabulary, an attribute, and a value drawn at random. The value depends on the triple
(k1, k2, attr) jointly, so no single embedding can hold it: the network has to compute the triple
in the LSTM below the middle layer and store the triple → value map in the layers above it.
Every (k1, k2, attr) of the vocabularies is a fact, and the values are exactly uniform (each value
the same number of times, shuffled), so a model that has stored nothing recalls 1/values of them.
All facts are training data and all are scored: this measures storage, not generalisation.

Each model is an ``lstm_moe_lm`` (embedding → LSTM → middle → LSTM → softmax, residual, no
dropout) trained by ``fairseq-train --criterion smoe_cross_entropy`` for the same number of
updates, at one active compute budget per token (the paper's proportions: k = 4 experts of
hidden 2 × width, = the two LSTMs that 4xLSTM puts in their place, = one expert of hidden
8 × width):

    moe-1-wide   one expert of hidden 8 × width (dense, same multiply-adds per token)
    4xlstm       no MoE: two LSTMs below and two above (App. C's matched baseline)
    moe-4 ... moe-256     flat noisy top-4 MoE of 4/16/64/256 experts, w_importance = w_load = 0.1
    moe-256-h    hierarchical, 16 groups, noisy top-2 at each level (2 × 2 = 4 experts); moe-1024-h
                 likewise, registered but not in the default list (too slow for the hour)

Scoring loads checkpoint_last.pt with fairseq's ``checkpoint_utils`` and runs the model on
``</s> k1 k2 attr`` for every fact: recall = the share of facts whose value is the argmax of the
model's next-token distribution (over the whole vocabulary), and the information stored =
N·log2(V) − Σ_facts −log2 p(value | k1 k2 attr), with p renormalised over the V value tokens (see
``information_bits``).

    .venv/bin/python examples/capacity/facts_benchmark.py            # everything (44 min here)
    .venv/bin/python examples/capacity/facts_benchmark.py --runs moe-256:1,4xlstm:1
    .venv/bin/python examples/capacity/facts_benchmark.py --report   # table + plot only

It resumes where it stopped: a run with a result is skipped, an interrupted one continues from its
checkpoint_last.pt in outputs/capacity/RUN/ (git-ignored; the data is in outputs/capacity/data/).
Two runs go side by side (--jobs), one thread each. Results: examples/capacity/results/facts.json
(written as each run finishes), facts.md and facts.png.
"""

import argparse
import concurrent.futures
import math
import os
import random
import re
import shutil
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import experiment_tools as tools  # noqa: E402

BIN = os.path.join(ROOT, ".venv", "bin")
WORK = os.path.join(ROOT, "outputs", "capacity")
RESULTS = os.path.join(ROOT, "examples", "capacity", "results")
RESULTS_JSON = os.path.join(RESULTS, "facts.json")

# ---------------------------------------------------------------------------------------------
# The final sizing, fixed from the pilots before the final runs (README: "Sizing"): 32 keys,
# 1024 entities (k1, k2) of 16 attributes each = 16,384 facts of 256 values (8 bits each,
# 131,072 bits in all); width 32; 4,000 updates of 64 entity lines (1,024 facts) = 250 passes.
TASK = {"keys": 32, "attrs": 16, "values": 256, "seed": 27}
WIDTH = 32               # embedding, LSTM units, MoE input/output
EXPERT_HIDDEN = 64       # 2 × width, as the paper's 1024 for width 512
K = 4                    # experts per token (flat); hierarchical: 2 per level
TRAIN = {"batch_size": 64, "lr": 0.01, "schedule": "fixed", "warmup": 200, "updates": 4000,
         "save_interval": 25}


def model_table(expert_hidden, k):
    """--arch lstm_moe_lm options of every model, at the active compute of k experts of
    ``expert_hidden`` (flat) = k/2 × 2 hierarchical = one expert of k × ``expert_hidden``."""
    moe = ["--moe-hidden-dim", str(expert_hidden), "--moe-gating", "noisy_top_k",
           "--moe-w-importance", "0.1", "--moe-w-load", "0.1"]
    return {
        "moe-1-wide": ["--moe-num-experts", "1", "--moe-k", "1", "--moe-gating", "top_k",
                       "--moe-hidden-dim", str(k * expert_hidden)],
        "4xlstm": ["--moe-num-experts", "0", "--lstm-layers-before-moe", "2",
                   "--lstm-layers-after-moe", "2"],
        **{f"moe-{n}": ["--moe-num-experts", str(n), "--moe-k", str(k), *moe] for n in (4, 16, 64, 256)},
        **{f"moe-{n}-h": ["--moe-num-experts", str(n), "--moe-groups", "16", "--moe-k",
                          str(int(round(math.sqrt(k)))), *moe] for n in (256, 1024)},
    }


MODELS = model_table(EXPERT_HIDDEN, K)
# The final list. MoE-1024-h (registered above, runnable with --runs moe-1024-h:1) is not in it:
# in the pilots one update of it cost about twice one of MoE-256, which does not fit the hour.
ORDER = ["moe-1-wide", "4xlstm", "moe-4", "moe-16", "moe-64", "moe-256", "moe-256-h"]
# Longest first, so that two workers finish together.
SCHEDULE = ["moe-256", "moe-256-h", "moe-64", "moe-16", "moe-4", "moe-1-wide", "4xlstm"]
SEEDS = (1, 2)
DENSE = ("moe-1-wide", "4xlstm")


def say(message):
    tools.say("facts_benchmark", message)


# ---------------------------------------------------------------------------------------------
# The data


def make_facts(keys, attrs, values, seed):
    """Every (k1, k2, attr) of the vocabularies with a random value: {(k1, k2): [value of attr 0,
    ..., value of attr attrs-1]}. The values are exactly uniform: each of the ``values`` values
    goes to the same number of facts (keys² · attrs must be a multiple of ``values``), in a
    seeded shuffle."""
    n = keys * keys * attrs
    if min(keys, attrs, values) < 1 or n % values:
        raise ValueError(f"keys² × attrs = {n} facts must be a positive multiple of values = {values}")
    rng = random.Random(seed)
    assigned = [v for v in range(values) for _ in range(n // values)]
    rng.shuffle(assigned)
    return {(a, b): assigned[(a * keys + b) * attrs:(a * keys + b + 1) * attrs]
            for a in range(keys) for b in range(keys)}


def entity_line(k1, k2, entity_values):
    """One line per entity (k1, k2): ``k1 k2 r0 v.. r1 v.. ...``, the attributes in a fixed order."""
    return " ".join([f"k{k1}", f"k{k2}"] + [f"r{r} v{v}" for r, v in enumerate(entity_values)])


def corpus_lines(facts, seed):
    """The training corpus: one line per entity, in a seeded random order."""
    entities = sorted(facts)
    random.Random(seed + 1).shuffle(entities)
    return [entity_line(a, b, facts[a, b]) for a, b in entities]


def prepare_data(task=None, work=None):
    """Write the corpus and binarize it with fairseq-preprocess; returns the data-bin folder.
    Skips what is done (a finished folder holds the stamp of its sizing)."""
    task = task or TASK
    work = work or WORK
    folder = os.path.join(work, "data")
    bin_dir = os.path.join(folder, "bin")
    stamp = os.path.join(folder, "sizing.txt")
    wanted = repr(sorted(task.items()))
    if os.path.exists(stamp) and open(stamp).read() == wanted:
        return bin_dir
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    facts = make_facts(task["keys"], task["attrs"], task["values"], task["seed"])
    with open(os.path.join(folder, "train.txt"), "w") as f:
        f.writelines(line + "\n" for line in corpus_lines(facts, task["seed"]))
    say(f"{len(facts) * task['attrs']} facts in {len(facts)} lines → {folder}/train.txt; fairseq-preprocess")
    tools.run_logged([os.path.join(BIN, "fairseq-preprocess"), "--only-source", "--task",
                      "language_modeling", "--trainpref", os.path.join(folder, "train.txt"),
                      "--destdir", bin_dir, "--workers", "1"],
                     os.path.join(folder, "preprocess.log"), ROOT, mode="w")
    with open(stamp, "w") as f:
        f.write(wanted)
    return bin_dir


# ---------------------------------------------------------------------------------------------
# Scoring


def recall_and_information(logprobs, targets, value_ids):
    """From the model's next-token log-probabilities at the value position of each fact.

    logprobs: float tensor [N, vocabulary]; targets: long [N], the value's vocabulary index;
    value_ids: the vocabulary indices of the V value tokens. Returns (recall, information bits,
    the value cross-entropy in bits summed over the facts). Recall takes the argmax over the whole
    vocabulary. The information is ``information_bits`` of the cross-entropy with p renormalised
    over the value tokens (which tokens can be values is known without any fact)."""
    import torch

    recall = float((logprobs.argmax(-1) == targets).double().mean())
    ids = torch.as_tensor(value_ids, dtype=torch.long)
    over_values = torch.log_softmax(logprobs.index_select(-1, ids).double(), dim=-1)
    position = (targets.unsqueeze(1) == ids.unsqueeze(0)).double().argmax(1)
    ce_bits = float(-over_values.gather(1, position.unsqueeze(1)).sum()) / math.log(2)
    return recall, information_bits(len(targets), len(value_ids), ce_bits), ce_bits


def information_bits(n_facts, n_values, ce_bits):
    """Information about the values the model holds at least: N·log2(V) − Σ −log2 p(value).

    A coding argument: with the model, the N values can be written in Σ −log2 p(value) bits (an
    arithmetic code); values drawn uniformly at random take N·log2(V) bits on average whatever
    the code, so the model (a function of the training data) must carry the difference. It can be
    negative (a model that is confidently wrong), and it is ≤ N·log2(V)."""
    return n_facts * math.log2(n_values) - ce_bits


def recall_bits(recall, n_facts, n_values):
    """The brief's simpler measure: recall × N × log2(V), as if each recalled fact were stored
    exactly and the others not at all (it counts the 1/V of facts right by chance, and nothing
    of a fact whose value is second in the model's ranking)."""
    return recall * n_facts * math.log2(n_values)


_score_lock = threading.Lock()


def score_checkpoint(checkpoint, bin_dir, task=None, chunk=256):
    """Recall and information of a trained checkpoint on all facts, plus parameter counts and the
    eval-mode routing (CV of the expert counts over the facts' four input positions)."""
    import logging

    import torch

    task = task or TASK
    with _score_lock:  # one at a time: both workers of --jobs 2 share this process
        torch.set_num_threads(1)
        logging.disable(logging.WARNING)
        from fairseq import checkpoint_utils

        from fairseq_smoe.plugin import install

        install()
        models, _, fs_task = checkpoint_utils.load_model_ensemble_and_task(
            [checkpoint], arg_overrides={"data": bin_dir})
        model = models[0].eval()
        d = fs_task.source_dictionary
        facts = make_facts(task["keys"], task["attrs"], task["values"], task["seed"])
        R = task["attrs"]
        entities = sorted(facts)
        rows = [[d.eos()] + [d.index(w) for w in entity_line(a, b, facts[a, b]).split()]
                for a, b in entities]
        # the output at position 3 + 2j (input r_j) predicts the value of attribute j
        positions = torch.tensor([3 + 2 * j for j in range(R)])
        targets = torch.tensor([d.index(f"v{v}") for e in entities for v in facts[e]])
        value_ids = [d.index(f"v{v}") for v in range(task["values"])]
        if d.unk() in value_ids or any(d.unk() in row for row in rows):
            raise RuntimeError(f"{bin_dir}/dict.txt lacks some token of the task")
        src = torch.tensor(rows)
        logprobs, counts = [], None
        with torch.no_grad():
            for start in range(0, len(src), chunk):
                out, extra = model(src[start:start + chunk])
                lp = model.get_normalized_probs((out, extra), log_probs=True)
                logprobs.append(lp.index_select(1, positions).reshape(-1, lp.shape[-1]).float())
                stats = extra.get("moe_stats", {}).get("moe")
                if stats is not None:
                    c = stats.counts.double().reshape(-1)
                    counts = c if counts is None else counts + c
        recall, info, ce_bits = recall_and_information(torch.cat(logprobs), targets, value_ids)
        moe = model.decoder.moe
        result = {"facts": len(targets), "values": task["values"], "recall": recall,
                  "bits": info, "bits_recall": recall_bits(recall, len(targets), task["values"]),
                  "value_ce_bits": ce_bits / len(targets),
                  "params": sum(p.numel() for p in model.parameters()),
                  "moe_params": sum(p.numel() for p in moe.parameters()) if moe is not None else 0}
        if counts is not None and counts.numel() > 1:
            result["eval_cv_load"] = float(counts.std(unbiased=False) / counts.mean())
            result["eval_unused_experts"] = int((counts == 0).sum())
        return result


# ---------------------------------------------------------------------------------------------
# Training


def train_command(model, seed, bin_dir, save_dir, train=None):
    train = train or TRAIN
    return [os.path.join(BIN, "fairseq-train"), bin_dir, "--user-dir", "fairseq_smoe",
            "--task", "language_modeling", "--arch", "lstm_moe_lm",
            "--decoder-embed-dim", str(WIDTH), "--decoder-hidden-size", str(WIDTH), "--dropout", "0",
            *MODELS[model], "--criterion", "smoe_cross_entropy",
            "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", str(train["lr"]),
            "--lr-scheduler", train["schedule"], "--warmup-updates", str(train["warmup"]),
            *(["--warmup-init-lr", "1e-7"] if train["schedule"] == "inverse_sqrt" else []),
            "--clip-norm", "1.0",
            "--sample-break-mode", "eos", "--tokens-per-sample", "512",
            "--batch-size", str(train["batch_size"]), "--max-update", str(train["updates"]),
            "--disable-validation", "--save-interval", str(train.get("save_interval", 25)),
            "--no-epoch-checkpoints", "--cpu", "--num-workers", "0", "--seed", str(seed),
            "--log-format", "simple", "--log-interval", "100", "--save-dir", save_dir]


def last_train_stats(log_text):
    """The figures of the last epoch summary ("| train | epoch N | ...") of a fairseq log."""
    found = re.findall(r"\| train \| epoch (\d+) \| (.*)", log_text)
    if not found:
        return {}
    return {key: float(value) for key, value in re.findall(r"(\w+) ([-\d.e+]+)(?: \||$)", found[-1][1])}


def train_and_score(model, seed, work=None, task=None, train=None):
    work = work or WORK
    run_dir = os.path.join(work, f"{model}.seed{seed}")
    os.makedirs(run_dir, exist_ok=True)
    bin_dir = os.path.join(work, "data", "bin")
    log_path = os.path.join(run_dir, "train.log")
    done = os.path.join(run_dir, "trained")
    if not os.path.exists(done):  # fairseq resumes from checkpoint_last.pt by itself
        started = os.path.getsize(log_path) if os.path.exists(log_path) else 0
        try:
            tools.run_logged(train_command(model, seed, bin_dir, os.path.join(run_dir, "checkpoints"),
                                           train), log_path, ROOT)
        except RuntimeError:
            # fairseq-train sometimes aborts in its interpreter's exit ("terminate called without
            # an active exception", status -6) after it has saved the last checkpoint and said
            # "done training": that run is complete. Any other failure is one.
            with open(log_path) as f:
                f.seek(started)
                if "| done training in" not in f.read():
                    raise
            say(f"{model} seed {seed}: fairseq-train aborted at exit after 'done training' (kept)")
        open(done, "w").close()
    started = time.time()
    result = {"model": model, "seed": seed}
    result.update(score_checkpoint(os.path.join(run_dir, "checkpoints", "checkpoint_last.pt"), bin_dir, task))
    with open(log_path) as f:
        log_text = f.read()
    stats = last_train_stats(log_text)
    result.update({"updates": int(stats.get("num_updates", 0)),
                   "train_loss_last_epoch": stats.get("loss"),
                   "train_wall_s": tools.training_wall(log_text),
                   "score_wall_s": round(time.time() - started, 1)})
    for key in ("moe_cv_imp", "moe_cv_load", "moe_max_load", "moe_dead"):
        if key in stats:
            result[key + "_last_epoch"] = stats[key]
    result["loss_curve"] = loss_curve(log_text)
    return result


def loss_curve(log_text, every=10):
    """(updates, training loss in bits per token) of every ``every``-th epoch summary and the last."""
    points = [(int(float(u)), float(loss)) for loss, u in
              re.findall(r"\| train \| epoch \d+ \| loss ([\d.]+) \|.*?\| num_updates (\d+)", log_text)]
    return points[every - 1::every] + (points[-1:] if len(points) % every else [])


# ---------------------------------------------------------------------------------------------
# Results


def load_results():
    return tools.load_json(RESULTS_JSON, {"runs": []})


def save_result(result):
    results = load_results()
    key = (result["model"], result["seed"])
    results["runs"] = [r for r in results["runs"] if (r["model"], r["seed"]) != key]
    results["runs"].append(result)
    results["runs"].sort(key=lambda r: (ORDER.index(r["model"]) if r["model"] in ORDER else len(ORDER),
                                        r["model"], r["seed"]))
    results["setting"] = {"task": TASK, "width": WIDTH, "expert_hidden": EXPERT_HIDDEN, "k": K,
                          "train": TRAIN}
    tools.save_json(results, RESULTS_JSON)


def by_model(results):
    grouped = {}
    for r in results["runs"]:
        grouped.setdefault(r["model"], []).append(r)
    names = [m for m in ORDER if m in grouped] + sorted(m for m in grouped if m not in ORDER)
    return [(m, grouped[m]) for m in names]


def experts_of(model):
    if model == "4xlstm":
        return 0
    return int(model.split("-")[1]) if model != "moe-1-wide" else 1


def mean_spread(values, digits):
    """"mean ± half range" of the seeds' values, ``digits`` decimals (a thousands comma for 0)."""
    form = f"{{:,.{digits}f}}"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return form.format(mean)
    return f"{form.format(mean)} ± {form.format((max(values) - min(values)) / 2)}"


def report(results):
    runs = results["runs"]
    if not runs:
        say(f"no results in {RESULTS_JSON} yet")
        return
    n_bits = runs[0]["facts"] * math.log2(runs[0]["values"])
    lines = [f"{runs[0]['facts']:,} facts of {runs[0]['values']} values = {n_bits:,.0f} bits. recall: the "
             "share of facts whose value is the argmax. bits: information stored, N·log2 V − Σ −log2 "
             "p(value) (p renormalised over the value tokens); bits (recall): recall × N × log2 V. "
             "Mean ± half range over the seeds.", "",
             "| model | experts | params | MoE params | recall | bits | bits (recall) | bits / param | "
             "bits / MoE param | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model, rs in by_model(results):
        p, mp = rs[0]["params"], rs[0]["moe_params"]
        per_moe = mean_spread([r["bits"] / mp for r in rs], 3) if mp else "-"
        lines.append(f"| {model} | {experts_of(model) or '-'} | {p:,} | {mp:,} | "
                     f"{mean_spread([r['recall'] for r in rs], 4)} | "
                     f"{mean_spread([r['bits'] for r in rs], 0)} | "
                     f"{mean_spread([r['bits_recall'] for r in rs], 0)} | "
                     f"{mean_spread([r['bits'] / p for r in rs], 3)} | {per_moe} | "
                     f"{','.join(str(r['seed']) for r in rs)} |")
    lines += ["", "| model | seed | recall | bits | bits (recall) | value CE (bits) | training loss, "
              "last epoch | CV(Load) train | CV(Load) eval | unused experts (eval) | updates | "
              "wall (train + score) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, rs in by_model(results):
        for r in rs:
            cv_train = f"{r['moe_cv_load_last_epoch']:.3f}" if "moe_cv_load_last_epoch" in r else "-"
            cv_eval = f"{r['eval_cv_load']:.3f}" if "eval_cv_load" in r else "-"
            unused = r.get("eval_unused_experts", "-")
            lines.append(f"| {model} | {r['seed']} | {r['recall']:.4f} | {r['bits']:,.0f} | "
                         f"{r['bits_recall']:,.0f} | {r['value_ce_bits']:.3f} | "
                         f"{r['train_loss_last_epoch']} | "
                         f"{cv_train} | {cv_eval} | {unused} | {r['updates']} | "
                         f"{r['train_wall_s']} + {r['score_wall_s']:.0f} s |")
    tools.write_table(lines, os.path.join(RESULTS, "facts.md"))
    plot(results, n_bits)


def plot(results, n_bits):
    plt = tools.pyplot("facts_benchmark")
    if plt is None:
        return
    fig, (left, right, curves) = plt.subplots(1, 3, figsize=(18, 4.8))
    groups = dict(by_model(results))
    flat = [m for m in groups if m.startswith("moe-") and m[4:].isdigit()]
    mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    if flat:
        xs = [groups[m][0]["moe_params"] for m in flat]
        left.plot(xs, [mean(groups[m], "recall") for m in flat], "-o", color="C0",
                  label="flat MoE (noisy top-4), mean of seeds")
        for m, x in zip(flat, xs):
            left.scatter([x] * len(groups[m]), [r["recall"] for r in groups[m]], color="C0", s=10, alpha=0.5)
            left.annotate(m, (x, mean(groups[m], "recall")), textcoords="offset points", xytext=(4, -12),
                          fontsize=8)
    for i, m in enumerate(m for m in groups if m.endswith("-h")):
        x = groups[m][0]["moe_params"]
        left.scatter([x] * len(groups[m]), [r["recall"] for r in groups[m]], color=f"C{3 + i}", marker="s",
                     s=14, alpha=0.5)
        left.plot([x], [mean(groups[m], "recall")], "s", color=f"C{3 + i}", markersize=8,
                  label=f"{m} (hierarchical, 16 groups, top-2 × top-2)")
    for m, colour in zip(DENSE, ("C1", "C2")):
        if m in groups:
            left.axhline(mean(groups[m], "recall"), color=colour, linestyle="--",
                         label=f"{m} (dense, same compute): {mean(groups[m], 'recall'):.3f}")
    values = results["runs"][0]["values"]
    left.axhline(1 / values, color="grey", linestyle=":", linewidth=0.8, label=f"chance (1/{values})")
    left.set_xscale("log")
    left.set_xlabel("parameters in the MoE layer (experts + gates)")
    left.set_ylabel("recall (share of facts, argmax)")
    left.set_ylim(0, 1.02)
    left.set_title(f"{results['runs'][0]['facts']:,} facts, equal compute per token", fontsize=10)
    left.legend(fontsize=7, loc="upper left")

    names = [m for m in groups]
    per_total = [mean(groups[m], "bits") / groups[m][0]["params"] for m in names]
    per_moe = [mean(groups[m], "bits") / groups[m][0]["moe_params"] if groups[m][0]["moe_params"] else 0
               for m in names]
    at = range(len(names))
    right.bar([i - 0.2 for i in at], per_total, width=0.4, label="bits / all parameters")
    right.bar([i + 0.2 for i in at], per_moe, width=0.4, label="bits / MoE-layer parameters")
    right.axhline(2.0, color="k", linestyle="--", linewidth=1,
                  label="≈2 bits/param: Allen-Zhu & Li 2024 (Part 3.3), 1000 exposures")
    right.set_xticks(list(at))
    right.set_xticklabels(names, rotation=30, fontsize=8)
    right.set_ylabel("information stored per parameter (bits)")
    right.set_yscale("log")
    right.set_ylim(top=10)  # room for the legend above the bars
    right.set_title(f"bits stored (of {n_bits:,.0f}) per parameter", fontsize=10)
    right.legend(fontsize=7)

    # Training loss against updates: how far from converged each run stopped. The floor is the
    # loss of a model that knows every value: only the two keys of a line are unpredictable.
    task = results.get("setting", {}).get("task", TASK)
    floor = 2 * math.log2(task["keys"]) / (2 + 2 * task["attrs"] + 1)
    for i, (m, rs) in enumerate(groups.items()):
        for r in rs:
            if r.get("loss_curve"):
                curves.plot(*zip(*r["loss_curve"]), color=f"C{i}", linestyle="-" if r["seed"] % 2 else "--",
                            linewidth=1, label=f"{m} s{r['seed']}")
    curves.axhline(floor, color="k", linestyle=":", linewidth=0.8, label=f"every value known ({floor:.3f})")
    curves.set_xlabel("updates")
    curves.set_ylabel("training loss (bits / token, epoch mean)")
    curves.set_title("training loss (seed 1 solid, seed 2 dashed)", fontsize=10)
    curves.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = os.path.join(RESULTS, "facts.png")
    fig.savefig(path, dpi=110)
    say(f"wrote {path}")


# ---------------------------------------------------------------------------------------------


def parse_runs(spec, parser):
    wanted = []
    for item in spec.split(","):
        model, _, seed = item.strip().partition(":")
        if model not in MODELS or not seed.isdigit() or int(seed) < 1:
            parser.error(f"bad run {item!r}: give MODEL:SEED (SEED >= 1) with MODEL one of "
                         f"{', '.join(MODELS)}")
        if (model, int(seed)) not in wanted:
            wanted.append((model, int(seed)))
    return wanted


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--runs", help="MODEL:SEED,... (default: every model of the final list, "
                                       "seeds 1 and 2)")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each (default 2)")
    parser.add_argument("--report", action="store_true", help="only write the table and the plot")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.jobs > 2:
        parser.error(f"--jobs must be 1 or 2 (one thread a run; this benchmark is sized for 2 cores), "
                     f"got {args.jobs}")
    if args.runs is not None and args.report:
        parser.error("--report draws from the results file alone; it takes no --runs")
    wanted = parse_runs(args.runs, parser) if args.runs else [(m, s) for m in SCHEDULE for s in SEEDS]
    if not args.report:
        if not os.access(os.path.join(BIN, "fairseq-train"), os.X_OK):
            parser.error(f"no {BIN}/fairseq-train: build the venv first (bash scripts/bootstrap.sh)")
        started = time.time()
        prepare_data()
        done = {(r["model"], r["seed"]) for r in load_results()["runs"]}
        todo = [run for run in wanted if run not in done]
        say(f"{len(wanted) - len(todo)} of {len(wanted)} runs already have results; {len(todo)} to go "
            f"({args.jobs} at a time, work in {WORK})")
        failed = []
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(train_and_score, m, s): (m, s) for m, s in todo}
            for future in concurrent.futures.as_completed(futures):
                model, seed = futures[future]
                try:
                    result = future.result()
                except RuntimeError as error:
                    say(f"{model} seed {seed} failed: {error}")
                    failed.append(f"{model}:{seed}")
                    continue
                save_result(result)
                say(f"{model} seed {seed}: recall {result['recall']:.4f}, {result['bits']:,.0f} bits, "
                    f"{result['train_wall_s']} s training ({time.time() - started:.0f} s since start)")
        say(f"wall time of this invocation: {time.time() - started:.0f} s")
        if failed:
            report(load_results())
            say(f"failed: {', '.join(failed)} (rerun the same command to retry them)")
            return 1
    report(load_results())
    return 0


if __name__ == "__main__":
    sys.exit(main())
