#!/usr/bin/env python
"""Per-expert utilisation of a trained lstm_moe_lm or lstm_moe_nmt checkpoint on a data split.

Runs the model over the first --max-tokens tokens of a binarized split (language models: in
blocks of --block tokens as fairseq-eval-lm reads them; translation: the split's sentence
pairs, teacher-forced) and prints, for every MoE layer (the LM's ``moe``; a translation model's
``encoder_moe`` and ``decoder_moe``) and every expert: the tokens routed to it, its share of all
assignments, its share of the gate mass (Importance, eq. 6), and the input words most
characteristic of it (highest P(word | expert) / P(word) among words it saw often enough;
source words for the encoder, target-side input words for the decoder). Then the paper's balance
figures (Table 6): CV(Importance), CV(Load), max/mean and min/mean load, unused experts and
unrouted tokens. Hierarchical layers also get a group × expert table of shares.

Routing: ``--routing eval`` (default) is what inference sees (deterministic gate without noise,
§2.1; App. F's learned thresholds for batchwise gating); ``--routing train`` puts the MoE layers
(only them: dropout stays off) in training mode, i.e. noisy top-k with its noise, batchwise
gating's per-batch top-m (Appendix F).

    python scripts/moe_utilisation.py --path outputs/demo/checkpoints/checkpoint_best.pt \\
        --data outputs/data/wikitext-2/bin --subset test --plot outputs/demo/experts.png

--plot saves a bar chart per flat layer and a group × expert heatmap per hierarchical layer.
"""

import argparse
import json
import logging
import os
import sys
import tempfile
from collections import Counter

import torch


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {value})")
    return value


def non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (all) or a positive integer (got {value})")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", required=True, help="checkpoint of an lstm_moe_lm or lstm_moe_nmt model")
    p.add_argument("--data", required=True, help="fairseq data dir (dict*.txt and the binarized split)")
    p.add_argument("--subset", default="test", help="split to run over (default: test)")
    p.add_argument("--max-tokens", type=non_negative_int, default=100000,
                   help="use the first N tokens of the split (translation: source tokens; 0: all; "
                        "default 100000)")
    p.add_argument("--block", type=positive_int, default=64,
                   help="language models: tokens per sequence block (default 64)")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="blocks (language models) or sentence pairs (translation) per forward")
    p.add_argument("--routing", choices=("eval", "train"), default="eval",
                   help="eval: the inference gate (default); train: the MoE layers in training "
                        "mode (noise, batchwise top-m)")
    p.add_argument("--seed", type=int, default=1, help="seed of the training-mode noise")
    p.add_argument("--top-words", type=int, default=5, help="characteristic words per expert")
    p.add_argument("--min-count", type=int, default=20,
                   help="a word needs this many tokens at an expert to be listed for it")
    p.add_argument("--per-expert", choices=("auto", "always", "never"), default="auto",
                   help="print the per-expert table (auto: up to 64 experts, or a flat layer)")
    p.add_argument("--plot", help="save a chart of the per-expert shares to this file")
    p.add_argument("--json", help="save the per-expert figures as JSON to this file")
    return p.parse_args(argv)


def fail(message):
    print(f"moe_utilisation: error: {message}", file=sys.stderr)
    sys.exit(2)


def load(args):
    logging.disable(logging.WARNING)
    from fairseq import checkpoint_utils

    from fairseq_smoe.plugin import install

    install()  # registers the models with fairseq (what --user-dir does)

    if not os.path.isfile(args.path):
        fail(f"no checkpoint at {args.path}; train one first (bash scripts/demo.sh)")
    if not os.path.isdir(args.data):
        fail(f"no data directory {args.data}; run scripts/prepare-wikitext2.sh or "
             f"scripts/prepare-multi30k.sh (or give --data)")
    check_data_fits(args)
    try:
        models, _, task = checkpoint_utils.load_model_ensemble_and_task(
            [args.path], arg_overrides={"data": args.data})
    except (ValueError, FileNotFoundError) as error:  # the plugin's checks name the fix
        if os.environ.get("SMOE_TRACEBACK", "0") not in ("", "0"):
            raise
        fail(str(error).strip())
    except RuntimeError as error:  # a dictionary the check above could not compare
        if "size mismatch" not in str(error):
            raise
        detail = next((line.strip() for line in str(error).splitlines()
                       if "size mismatch" in line), "")
        fail(f"{args.path} does not fit the data in {args.data} ({detail}): it was binarized with "
             f"another dictionary; give --data the folder the checkpoint was trained on")
    return models[0], task


def _get(config, key):
    if config is None:
        return None
    return config.get(key) if hasattr(config, "get") else getattr(config, key, None)


def check_data_fits(args):
    """The data folder is of the checkpoint's task and its dictionaries have the sizes the model
    was trained with; else one line naming the mismatch (fairseq: a traceback, or an error about
    a missing file or language pair)."""
    from fairseq.data import Dictionary, data_utils

    try:  # memory-mapped: the configuration and the tensors' shapes, not their bytes
        state = torch.load(args.path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:
        return  # not a zip checkpoint: the loader names what is wrong with the file
    task = _get(state.get("cfg"), "task")
    name = _get(task, "_name") or _get(state.get("args"), "task")
    weights = state.get("model") or {}
    dicts = sorted(f for f in os.listdir(args.data) if f.startswith("dict.") and f.endswith(".txt"))
    if name == "language_modeling":
        if "dict.txt" not in dicts:
            held = (f"translation data ({', '.join(dicts)})" if dicts else "no dict.txt")
            fail(f"{args.path} is a language model (task language_modeling), but {args.data} holds "
                 f"{held}; give --data the language-model folder it was trained on (with dict.txt, "
                 f"e.g. outputs/data/wikitext-2/bin from scripts/prepare-wikitext2.sh)")
        sides = [("dict.txt", "decoder.embed_tokens.weight")]
    elif name == "translation":
        source, target = _get(task, "source_lang"), _get(task, "target_lang")
        if not (source and target):
            source, target = data_utils.infer_language_pair(args.data)
        missing = [f"dict.{lang}.txt" for lang in (source, target)
                   if lang and f"dict.{lang}.txt" not in dicts]
        if not (source and target) or missing:
            held = ("language-model data (dict.txt)" if dicts == ["dict.txt"] else
                    f"no {' or '.join(missing)}" if missing else
                    "no binarized language pair (SPLIT.SRC-TGT.LANG.idx)")
            fail(f"{args.path} is a translation model (task translation), but {args.data} holds "
                 f"{held}; give --data the translation folder it was trained on (dict.SRC.txt, "
                 f"dict.TGT.txt and SPLIT.SRC-TGT.*, e.g. outputs/data/multi30k.en-de/bin from "
                 f"scripts/prepare-multi30k.sh)")
        sides = [(f"dict.{source}.txt", "encoder.embed_tokens.weight"),
                 (f"dict.{target}.txt", "decoder.embed_tokens.weight")]
    else:
        return
    for dict_name, key in sides:
        if key not in weights:
            continue
        size, trained = len(Dictionary.load(os.path.join(args.data, dict_name))), weights[key].shape[0]
        if size != trained:
            fail(f"{os.path.join(args.data, dict_name)} has {size} entries, but {args.path} was "
                 f"trained with a dictionary of {trained}: the data was binarized for another "
                 f"model; give --data the folder the checkpoint was trained on (or binarize the "
                 f"text again with its dictionary: fairseq-preprocess --srcdict)")


def check_writable(path, option):
    """Before the analysis: an output file that cannot be written is refused now, not after it."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        fail(f"{option} {path} is a directory; give a file name")
    if not os.path.isdir(folder):
        fail(f"cannot write {option} {path}: the folder {folder} does not exist; create it or "
             f"give another {option}")
    try:
        if os.path.exists(path):
            open(path, "a").close()  # opened, not changed
        else:
            tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        fail(f"cannot write {option} {path} ({error.strerror or error}); give another {option}")


def moe_layers(model):
    """[(name, layer, side)], side 'source' (encoder) or 'target' (decoder / language model)."""
    from fairseq_smoe.modules.moe_layer import MoELayerBase

    found = [(path, m) for path, m in model.named_modules() if isinstance(m, MoELayerBase)]
    has_encoder_moe = any(path.startswith("encoder.") for path, _ in found)
    layers = []
    for path, layer in found:
        side = "source" if path.startswith("encoder.") else "target"
        name = f"{path.split('.')[0]}_moe" if has_encoder_moe or path.startswith("encoder.") \
            else "moe"
        if name in [n for n, _, _ in layers]:
            name = path.replace(".", "_")
        layers.append((name, layer, side))
    return layers


class Recorder:
    """Sums a layer's statistics and, per expert, the input words of the rows routed to it."""

    def __init__(self, layer):
        self.layer = layer
        self.counts = self.importance = None
        self.tokens = self.unrouted = 0
        self.words = [Counter() for _ in range(layer.num_experts)]
        self.word_rows = None  # the words of this call's rows, set before the model runs
        self.shape = None
        self.hooks = [layer.register_forward_pre_hook(self._before),
                      layer.register_forward_hook(self._after)]
        self._combine = layer._experts_and_combine
        layer._experts_and_combine = self._experts_and_combine  # sees rows and their experts

    def close(self):
        for hook in self.hooks:
            hook.remove()
        del self.layer._experts_and_combine

    def _before(self, module, inputs):
        self.shape = tuple(inputs[0].shape[:-1])

    def _after(self, module, inputs, output):
        stats = output[1]
        counts, importance = stats.counts.double(), stats.importance.double()
        self.counts = counts if self.counts is None else self.counts + counts
        self.importance = importance if self.importance is None else self.importance + importance
        self.tokens += int(stats.num_tokens)
        self.unrouted += int(stats.unrouted)

    def _experts_and_combine(self, backend, x_TD, row_A, expert_A, *rest, **kwargs):
        words = self.rows_to_words()
        if words is not None:
            keep = expert_A < self.layer.num_experts
            for expert, word in zip(expert_A[keep].tolist(), words[row_A[keep]].tolist()):
                self.words[expert][word] += 1
        return self._combine(backend, x_TD, row_A, expert_A, *rest, **kwargs)

    def rows_to_words(self):
        """The word of each row of the layer's flattened input (batch- or time-major)."""
        tokens_BT = self.word_rows
        if tokens_BT is None:
            return None
        if self.shape == tuple(tokens_BT.shape):
            return tokens_BT.reshape(-1)
        if self.shape == tuple(tokens_BT.t().shape):
            return tokens_BT.t().reshape(-1)
        return None


def set_routing(model, layers, routing):
    model.eval()
    if routing == "train":
        for _, layer, _ in layers:
            layer.train()


@torch.no_grad()
def run_language_model(args, model, task, recorders):
    from fairseq.data import data_utils

    prefix = os.path.join(args.data, args.subset)
    if not os.path.isfile(prefix + ".bin"):
        fail(f"no binarized split {prefix}.bin; run scripts/prepare-wikitext2.sh (or give --data)")
    dataset = data_utils.load_indexed_dataset(prefix, task.dictionary)
    stream = torch.cat([dataset[i] for i in range(len(dataset))])
    if args.max_tokens:
        stream = stream[: args.max_tokens]
    usable = (len(stream) - 1) // args.block * args.block
    blocks = stream[:usable].view(-1, args.block)
    batch = args.batch_size if args.batch_size != args.block else args.batch_size - 1  # B != T
    for start in range(0, len(blocks), batch):
        tokens_BT = blocks[start : start + batch]
        if tokens_BT.shape[0] == tokens_BT.shape[1] and tokens_BT.shape[0] > 1:
            tokens_BT = tokens_BT[:-1]  # B == T would leave the row order ambiguous
        for recorder in recorders.values():
            recorder.word_rows = tokens_BT
        model(tokens_BT)
    used = Counter(stream[:usable].tolist())
    return {"target": used}, {"target": task.dictionary}


@torch.no_grad()
def run_translation(args, model, task, recorders):
    from fairseq import utils

    try:
        task.load_dataset(args.subset)
    except FileNotFoundError as error:
        fail(f"{error}; run scripts/prepare-multi30k.sh (or give --data and --subset)")
    dataset = task.dataset(args.subset)
    iterator = task.get_batch_iterator(dataset, max_sentences=args.batch_size,
                                       required_batch_size_multiple=1).next_epoch_itr(shuffle=False)
    pad = task.source_dictionary.pad()
    seen = {"source": Counter(), "target": Counter()}
    source_tokens = 0
    for sample in iterator:
        net_input = sample["net_input"]
        right_src = utils.convert_padding_direction(net_input["src_tokens"], pad, left_to_right=True)
        prev = net_input["prev_output_tokens"]
        for recorder, side in recorders.values():
            recorder.word_rows = right_src if side == "source" else prev
        model(**net_input)
        for side, tokens in (("source", right_src), ("target", prev)):
            seen[side].update(tokens[tokens.ne(pad)].tolist())
        source_tokens += int(net_input["src_tokens"].ne(pad).sum())
        if args.max_tokens and source_tokens >= args.max_tokens:
            break
    return seen, {"source": task.source_dictionary, "target": task.target_dictionary}


def characteristic_words(words, overall, dictionary, top, min_count):
    n, total = sum(words.values()), sum(overall.values())
    scored = [(count / n / (overall[w] / total), w) for w, count in words.items()
              if count >= min_count and overall[w]]
    return [dictionary[w] for _, w in sorted(scored, reverse=True)[:top]]


def cv(v):
    v = v.reshape(-1)
    return float(v.std(unbiased=False) / v.mean()) if v.mean() > 0 else 0.0


def report(name, layer, recorder, overall, dictionary, side, args, is_lm):
    counts, importance = recorder.counts, recorder.importance
    flat_counts, flat_importance = counts.reshape(-1), importance.reshape(-1)
    share = flat_counts / flat_counts.sum().clamp_min(1)
    gate_share = flat_importance / flat_importance.sum().clamp_min(1e-30)
    per_group = getattr(layer, "experts_per_group", None)
    groups = getattr(layer, "num_groups", None)
    words_kind = "input words" if is_lm else f"{side} words"
    print(f"\nLayer '{name}' on '{args.subset}': {recorder.tokens} tokens, {args.routing}-mode "
          f"routing, {layer.num_experts} experts"
          + (f" ({groups} groups x {per_group})" if per_group else "")
          + f"; uniform share = {100 / len(share):.2f} %")
    rows = []
    for e in range(len(share)):
        expert = f"{e // per_group}.{e % per_group}" if per_group else str(e)
        words = characteristic_words(recorder.words[e], overall, dictionary, args.top_words,
                                     args.min_count)
        rows.append({"expert": expert, "tokens": int(flat_counts[e]), "share": float(share[e]),
                     "gate_share": float(gate_share[e]), "words": words})
    show = args.per_expert == "always" or (args.per_expert == "auto"
                                           and (not per_group or len(rows) <= 64))
    if show:
        header = f"{'expert':>8} {'tokens':>9} {'share %':>8} {'gate %':>7}  characteristic {words_kind}"
        print(header)
        print("-" * len(header))
        for row in rows:
            print(f"{row['expert']:>8} {row['tokens']:>9} {100 * row['share']:>8.2f} "
                  f"{100 * row['gate_share']:>7.2f}  " + " ".join(row["words"]))
    if per_group:
        grid = (100 * share).reshape(groups, per_group)
        print(f"\nshare % of the tokens, group (row) x expert in group (column); "
              f"uniform {100 / len(share):.2f}")
        print("group " + "".join(f"{j:>6}" for j in range(per_group)) + "   group %")
        for i in range(groups):
            print(f"{i:>5} " + "".join(f"{float(v):>6.2f}" for v in grid[i])
                  + f"   {float(grid[i].sum()):>6.2f}")
    summary = {"cv_importance": cv(importance), "cv_load": cv(counts),
               "max_over_mean_load": float(flat_counts.max() / flat_counts.mean().clamp_min(1e-30)),
               "min_over_mean_load": float(flat_counts.min() / flat_counts.mean().clamp_min(1e-30)),
               "unused_experts": int((flat_counts == 0).sum()),
               "tokens": recorder.tokens, "unrouted_tokens": recorder.unrouted}
    print(f"\nCV(Importance) {summary['cv_importance']:.3f}   CV(Load) {summary['cv_load']:.3f}   "
          f"max/mean load {summary['max_over_mean_load']:.2f}   min/mean load "
          f"{summary['min_over_mean_load']:.2f}   unused experts {summary['unused_experts']}   "
          f"unrouted tokens {recorder.unrouted} ({100 * recorder.unrouted / max(recorder.tokens, 1):.1f} %)"
          f"   (paper Table 6, MoE-256 with w=0.1: 0.06 / 0.05 / 1.14)")
    return {"experts": rows, "groups": groups, "experts_per_group": per_group, **summary}


def plot(path, results, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    widths = [max(6.0, 0.35 * len(results[n]["experts"])) if not results[n]["groups"] else 6.0
              for n in names]
    fig, axes = plt.subplots(1, len(names), figsize=(min(sum(widths), 24), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        result, rows = results[name], results[name]["experts"]
        title = (f"{name} on {args.subset} ({args.routing} routing): CV(Imp) "
                 f"{result['cv_importance']:.2f}, max/mean {result['max_over_mean_load']:.2f}")
        if result["groups"]:  # group x expert heatmap, not a strip of hundreds of bars
            grid = torch.tensor([100 * r["share"] for r in rows]).reshape(result["groups"], -1)
            image = ax.imshow(grid.numpy(), cmap="viridis", aspect="auto")
            ax.set_xlabel("expert within group")
            ax.set_ylabel("group")
            fig.colorbar(image, ax=ax, label=f"share of tokens (%), uniform {100 / len(rows):.2f}")
        else:
            positions = range(len(rows))
            ax.bar([p - 0.2 for p in positions], [100 * r["share"] for r in rows], 0.4,
                   label="tokens routed")
            ax.bar([p + 0.2 for p in positions], [100 * r["gate_share"] for r in rows], 0.4,
                   label="gate mass")
            ax.axhline(100 / len(rows), color="k", ls="--", lw=1, label="uniform")
            ax.set_xticks(list(positions), [r["expert"] for r in rows],
                          rotation=90 if len(rows) > 32 else 0)
            ax.set_xlabel("expert")
            ax.set_ylabel("share of all (%)")
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"[moe_utilisation] plot saved to {path}", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_writable(path, option)
    model, task = load(args)
    layers = moe_layers(model)
    if not layers:
        fail(f"{args.path} has no MoE layer (a dense baseline?): nothing to report")
    torch.manual_seed(args.seed)
    set_routing(model, layers, args.routing)
    is_lm = not hasattr(model, "encoder")
    recorders = {name: (Recorder(layer), side) for name, layer, side in layers}
    print(f"[moe_utilisation] {args.subset}: {len(layers)} MoE layer(s) "
          f"({', '.join(recorders)}), {args.routing}-mode routing", file=sys.stderr)
    if is_lm:
        seen, dictionaries = run_language_model(args, model, task,
                                                {n: r for n, (r, _) in recorders.items()})
    else:
        seen, dictionaries = run_translation(args, model, task, recorders)
    results = {}
    for name, layer, side in layers:
        recorder = recorders[name][0]
        recorder.close()
        if recorder.counts is None:
            fail(f"layer {name} saw no token: is {args.subset} empty?")
        results[name] = report(name, layer, recorder, seen[side], dictionaries[side], side, args,
                               is_lm)
    first = results[layers[0][0]]
    if args.json:
        with open(args.json, "w") as f:
            # Top level: the first layer (the LM's only one), as before; every layer under "layers".
            json.dump({**first, "routing": args.routing, "layers": results}, f, indent=1)
    if args.plot:
        plot(args.plot, results, args)
    return first if len(results) == 1 else results


if __name__ == "__main__":
    main()
