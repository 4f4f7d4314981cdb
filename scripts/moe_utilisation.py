#!/usr/bin/env python
"""Per-expert utilisation of a trained lstm_moe_lm checkpoint on a data split.

Runs the model in eval mode (deterministic gate: no noise, §2.1) over the first --max-tokens
tokens of a binarized split, in blocks of --block tokens as fairseq-eval-lm reads it, and
prints for every expert: the tokens routed to it, its share of all assignments, its share of
the gate mass (Importance, eq. 6), and the input words most characteristic of it (highest
P(word | expert) / P(word) among words it saw often enough). Also the paper's balance figures
(Table 6): CV(Importance), CV(Load) and max/mean load. Saves a bar chart with --plot.

    python scripts/moe_utilisation.py --path outputs/demo/checkpoints/checkpoint_best.pt \\
        --data outputs/data/wikitext-2/bin --subset test --plot outputs/demo/experts.png
"""

import argparse
import json
import logging
import os
import sys
from collections import Counter

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", required=True, help="checkpoint of an lstm_moe_lm model")
    p.add_argument("--data", required=True, help="fairseq data dir (with dict.txt and SPLIT.bin)")
    p.add_argument("--subset", default="test", help="split to run over (default: test)")
    p.add_argument("--max-tokens", type=int, default=100000,
                   help="use the first N tokens of the split (0: all; default 100000)")
    p.add_argument("--block", type=int, default=64, help="tokens per sequence block (default 64)")
    p.add_argument("--batch-size", type=int, default=64, help="blocks per forward (default 64)")
    p.add_argument("--top-words", type=int, default=5, help="characteristic words per expert")
    p.add_argument("--min-count", type=int, default=20,
                   help="a word needs this many tokens at an expert to be listed for it")
    p.add_argument("--plot", help="save a bar chart of the per-expert shares to this file")
    p.add_argument("--json", help="save the per-expert figures as JSON to this file")
    return p.parse_args(argv)


def fail(message):
    print(f"moe_utilisation: error: {message}", file=sys.stderr)
    sys.exit(2)


def load(args):
    logging.disable(logging.WARNING)
    from fairseq import checkpoint_utils
    from fairseq.data import data_utils

    from fairseq_smoe.compat import install_all

    install_all()  # registers the plugin with fairseq, installs its patches

    if not os.path.isfile(args.path):
        fail(f"no checkpoint at {args.path}; train one first (bash scripts/demo.sh)")
    prefix = os.path.join(args.data, args.subset)
    if not os.path.isfile(prefix + ".bin"):
        fail(f"no binarized split {prefix}.bin; run scripts/prepare-wikitext2.sh (or give --data)")
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [args.path], arg_overrides={"data": args.data})
    model = models[0].eval()
    moe = getattr(model.decoder, "moe", None)
    if moe is None:
        fail(f"{args.path} has no MoE layer (a dense baseline?): nothing to report")
    dataset = data_utils.load_indexed_dataset(prefix, task.dictionary)
    stream = torch.cat([dataset[i] for i in range(len(dataset))])
    if args.max_tokens:
        stream = stream[: args.max_tokens]
    return model, moe.moe, task.dictionary, stream


@torch.no_grad()
def collect(model, layer, stream, block, batch_size):
    """Sum of counts and importance over the stream, and (flat layers) the words per expert."""
    flat = hasattr(layer, "gate")
    counts = importance = None
    words_per_expert = [Counter() for _ in range(layer.num_experts)] if flat else None
    captured = {}
    hooks = [layer.register_forward_hook(lambda m, inp, out: captured.__setitem__("stats", out[1]))]
    if flat:
        hooks.append(layer.gate.register_forward_hook(
            lambda m, inp, out: captured.__setitem__("gate", out)))
    usable = (len(stream) - 1) // block * block
    blocks = stream[:usable].view(-1, block)
    for start in range(0, len(blocks), batch_size):
        tokens_BT = blocks[start : start + batch_size]
        model(tokens_BT)
        stats = captured["stats"]
        step_counts, step_importance = stats.counts.double(), stats.importance.double()
        counts = step_counts if counts is None else counts + step_counts
        importance = step_importance if importance is None else importance + step_importance
        if flat:
            decision = captured["gate"]
            words_TB = tokens_BT.t().reshape(-1)  # the MoE sees time-major rows
            keep = decision.expert_A < layer.num_experts
            experts, words = decision.expert_A[keep].tolist(), words_TB[decision.row_A[keep]].tolist()
            for expert, word in zip(experts, words):
                words_per_expert[expert][word] += 1
    for hook in hooks:
        hook.remove()
    return counts, importance, words_per_expert, usable


def characteristic_words(words, overall, total, dictionary, top, min_count):
    n = sum(words.values())
    scored = [(count / n / (overall[w] / total), w) for w, count in words.items() if count >= min_count]
    return [dictionary[w] for _, w in sorted(scored, reverse=True)[:top]]


def cv(v):
    v = v.reshape(-1)
    return float(v.std(unbiased=False) / v.mean()) if v.mean() > 0 else 0.0


def main(argv=None):
    args = parse_args(argv)
    model, layer, dictionary, stream = load(args)
    print(f"[moe_utilisation] {args.subset}: running {layer.__class__.__name__} "
          f"({layer.num_experts} experts) over {min(len(stream), args.max_tokens or len(stream))} tokens",
          file=sys.stderr)
    counts, importance, words_per_expert, used = collect(model, layer, stream, args.block, args.batch_size)
    overall = Counter(stream[:used].tolist())
    flat_counts, flat_importance = counts.reshape(-1), importance.reshape(-1)
    share = flat_counts / flat_counts.sum()
    gate_share = flat_importance / flat_importance.sum()
    rows = []
    per_group = getattr(layer, "experts_per_group", None)
    print(f"\nPer-expert utilisation on '{args.subset}' ({used} tokens, eval-mode gate; uniform share "
          f"= {100 / len(share):.2f} %)")
    header = f"{'expert':>8} {'tokens':>9} {'share %':>8} {'gate %':>7}  characteristic input words"
    print(header)
    print("-" * len(header))
    for e in range(len(share)):
        name = f"{e // per_group}.{e % per_group}" if per_group else str(e)
        words = (characteristic_words(words_per_expert[e], overall, used, dictionary, args.top_words,
                                      args.min_count) if words_per_expert else [])
        rows.append({"expert": name, "tokens": int(flat_counts[e]), "share": float(share[e]),
                     "gate_share": float(gate_share[e]), "words": words})
        print(f"{name:>8} {int(flat_counts[e]):>9} {100 * share[e]:>8.2f} {100 * gate_share[e]:>7.2f}  "
              + " ".join(words))
    summary = {"cv_importance": cv(importance), "cv_load": cv(counts),
               "max_over_mean_load": float(flat_counts.max() / flat_counts.mean()),
               "unused_experts": int((flat_counts == 0).sum())}
    print(f"\nCV(Importance) {summary['cv_importance']:.3f}   CV(Load) {summary['cv_load']:.3f}   "
          f"max/mean load {summary['max_over_mean_load']:.2f}   unused experts {summary['unused_experts']}"
          f"   (paper Table 6, MoE-256 with w=0.1: 0.06 / 0.05 / 1.14)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"experts": rows, **summary}, f, indent=1)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows)), 3.5))
        positions = range(len(rows))
        ax.bar([p - 0.2 for p in positions], [100 * r["share"] for r in rows], 0.4, label="tokens routed")
        ax.bar([p + 0.2 for p in positions], [100 * r["gate_share"] for r in rows], 0.4, label="gate mass")
        ax.axhline(100 / len(rows), color="k", ls="--", lw=1, label="uniform")
        ax.set_xticks(list(positions), [r["expert"] for r in rows], rotation=90 if len(rows) > 32 else 0)
        ax.set_xlabel("expert")
        ax.set_ylabel("share of all (%)")
        ax.set_title(f"MoE utilisation on {args.subset}: CV(Importance) {summary['cv_importance']:.2f}, "
                     f"max/mean load {summary['max_over_mean_load']:.2f}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"[moe_utilisation] plot saved to {args.plot}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
