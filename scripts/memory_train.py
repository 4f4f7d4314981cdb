#!/usr/bin/env python
"""Memory of training an lstm_moe_lm preset: parameters, gradients and optimizer state (Adam vs
smoe_adam, App. D), per worker count, and the peak RSS of a few real fairseq-train updates.

    # accounting only (models built on the meta device: no memory, any preset, any vocabulary)
    .venv/bin/python scripts/memory_train.py --archs lstm_moe_lm_1b_moe_1024_h,lstm_moe_lm_1b_moe_4096_h
    # plus the GPU table: which presets fit which memory per worker count
    .venv/bin/python scripts/memory_train.py --gpu-table
    # measure: fairseq-train 2 updates with smoe_adam and --moe-recompute, peak RSS of the process
    .venv/bin/python scripts/memory_train.py --archs lstm_moe_lm_1b_moe_1024_h --measure smoe_adam

Accounting (bytes, fp32): parameters 4·P, gradients 4·P, Adam 8·P (two moments), smoe_adam
8·P_shared + 4·(expert rows + columns + expert biases) (``smoe_adam.state_elements``). With
expert parallelism on W workers each worker holds the shared parameters and 1/W of the experts
(and of their state). Activations, the data and the framework come on top: the measured peak
RSS shows them for CPU training here. fairseq's Adam step also allocates a temporary the size of
each parameter in turn (√v + ε), so its peak holds one more copy of the largest tensor;
smoe_adam updates expert tensors in blocks of at most 2^24 elements.

The vocabulary: ``--vocab`` entries (default 793,471: the paper's 1B Word vocabulary; the
presets' adaptive softmax) for the accounting tables; a measured run uses its data's dictionary
(WikiText-2 here: 33,280) and the accounting printed next to it uses that one as well.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DEFAULT_DATA = os.path.join(ROOT, "outputs", "data", "wikitext-2", "bin")
LARGE = ("lstm_moe_lm_1b_moe_256,lstm_moe_lm_1b_moe_256_h,lstm_moe_lm_1b_moe_1024_h,"
         "lstm_moe_lm_1b_moe_4096_h,lstm_moe_lm_1b_moe_34m,lstm_moe_lm_1b_moe_143m")
GB = 1e9
GIB = 2 ** 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default=LARGE, help="comma-separated lstm_moe_lm presets")
    p.add_argument("--vocab", type=int, default=793471, help="vocabulary of the accounting tables")
    p.add_argument("--adaptive-softmax-cutoff", default=None,
                   help="override the presets' cutoffs (measured runs: 10000,20000 for WikiText-2)")
    p.add_argument("--workers", default="1,2,4,8,16", help="worker counts of the tables")
    p.add_argument("--gpu-table", action="store_true", help="which preset fits which GPU memory")
    p.add_argument("--gpu-memory", default="24,40,80", help="GB per GPU for --gpu-table")
    p.add_argument("--activation-share", type=float, default=0.25,
                   help="share of GPU memory left for activations etc. in --gpu-table")
    p.add_argument("--measure", default="", help="comma-separated optimizers to train with "
                   "(adam, smoe_adam): fairseq-train runs, one at a time, peak RSS of each")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--updates", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--tokens-per-sample", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-recompute", action="store_true", help="measure without --moe-recompute")
    p.add_argument("--extra", default="", help="more fairseq-train arguments, one string")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Accounting


def build_on_meta(arch: str, vocab: int, cutoff=None):
    """The preset's model with meta tensors (shapes only) for a vocabulary of ``vocab``."""
    import torch
    from fairseq import options
    from fairseq.data import Dictionary
    from fairseq.models import ARCH_MODEL_REGISTRY

    from fairseq_smoe.plugin import install

    install()  # registers the plugin with fairseq, installs its patches

    argv = ["unused", "--task", "language_modeling", "--arch", arch, "--user-dir",
            os.path.join(ROOT, "fairseq_smoe")]
    if cutoff:
        argv += ["--adaptive-softmax-cutoff", cutoff]
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, argv)
    dictionary = Dictionary()
    for i in range(vocab - len(dictionary)):
        dictionary.add_symbol(f"w{i}")

    class Task:
        source_dictionary = target_dictionary = dictionary

    with torch.device("meta"):
        return ARCH_MODEL_REGISTRY[arch].build_model(args, Task())


def account(arch: str, vocab: int, cutoff=None) -> dict:
    from fairseq_smoe.optim.smoe_adam import is_expert_param, state_elements

    model = build_on_meta(arch, vocab, cutoff)
    params = [p for p in model.parameters() if p.requires_grad]
    experts = [p for p in params if is_expert_param(p)]
    shared = [p for p in params if not is_expert_param(p)]
    n_shared, n_expert = sum(p.numel() for p in shared), sum(p.numel() for p in experts)
    return {"arch": arch, "vocab": vocab, "shared_params": n_shared, "expert_params": n_expert,
            "adam_shared_state": sum(state_elements(p, "full") for p in shared),
            "adam_expert_state": sum(state_elements(p, "full") for p in experts),
            "smoe_expert_state": sum(state_elements(p, "factored") for p in experts),
            "largest_param": max(p.numel() for p in params)}


def per_worker(row: dict, workers: int) -> dict:
    """Bytes one of ``workers`` expert-parallel workers holds (fp32)."""
    params = row["shared_params"] + row["expert_params"] / workers
    adam = row["adam_shared_state"] + row["adam_expert_state"] / workers
    smoe = row["adam_shared_state"] + row["smoe_expert_state"] / workers
    return {"params": 4 * params, "grads": 4 * params, "adam": 4 * adam, "smoe_adam": 4 * smoe}


def print_accounting(rows, worker_counts):
    print("Parameters and optimizer state (fp32), per worker")
    print(f"{'preset':28s}{'W':>4}{'params':>10}{'grads':>10}{'Adam':>10}{'smoe_adam':>11}"
          f"{'total Adam':>12}{'total smoe':>12}   (GB)")
    for row in rows:
        total = (row["shared_params"] + row["expert_params"]) / 1e6
        print(f"{row['arch']:28s}  {total:,.0f}M parameters ({row['expert_params'] / 1e6:,.0f}M "
              f"in experts), vocabulary {row['vocab']:,}; expert state: Adam "
              f"{4 * row['adam_expert_state'] / GB:.2f} GB, smoe_adam "
              f"{4 * row['smoe_expert_state'] / GB:.4f} GB "
              f"({100 * (1 - row['smoe_expert_state'] / row['adam_expert_state']):.2f} % less)")
        for w in worker_counts:
            b = per_worker(row, w)
            print(f"{'':28s}{w:>4}{b['params'] / GB:>10.2f}{b['grads'] / GB:>10.2f}"
                  f"{b['adam'] / GB:>10.2f}{b['smoe_adam'] / GB:>11.2f}"
                  f"{(b['params'] + b['grads'] + b['adam']) / GB:>12.2f}"
                  f"{(b['params'] + b['grads'] + b['smoe_adam']) / GB:>12.2f}")


def gpu_table(rows, worker_counts, memories, share):
    """Fewest workers whose per-worker params + grads + optimizer state fit in (1 - share) of
    each GPU memory, for Adam and smoe_adam."""
    print(f"\nFewest expert-parallel workers whose parameters + gradients + optimizer state (fp32) "
          f"fit in {100 * (1 - share):.0f} % of a GPU's memory ({100 * share:.0f} % left for "
          f"activations, CUDA context, allocator)")
    head = "".join(f"{f'{m:g} GB Adam':>14}{f'{m:g} GB smoe':>14}" for m in memories)
    print(f"{'preset':28s}{head}")
    out = []
    for row in rows:
        cells, entry = "", {"arch": row["arch"]}
        for m in memories:
            for opt in ("adam", "smoe_adam"):
                fit = None
                for w in worker_counts:
                    b = per_worker(row, w)
                    if b["params"] + b["grads"] + b[opt] <= (1 - share) * m * GB:
                        fit = w
                        break
                entry[f"{m:g}GB_{opt}"] = fit
                cells += f"{(str(fit) if fit else '> ' + str(worker_counts[-1])):>14}"
        print(f"{row['arch']:28s}{cells}")
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------
# Measured runs


def measure(arch: str, optimizer: str, args) -> dict:
    exe = os.path.join(ROOT, ".venv", "bin", "fairseq-train")
    cmd = [exe, args.data, "--user-dir", os.path.join(ROOT, "fairseq_smoe"),
           "--task", "language_modeling", "--arch", arch, "--criterion", "smoe_cross_entropy",
           "--optimizer", optimizer, "--lr", "0.001", "--lr-scheduler", "inverse_sqrt",
           "--warmup-updates", "100", "--clip-norm", "1.0",
           "--tokens-per-sample", str(args.tokens_per_sample), "--sample-break-mode", "none",
           "--max-tokens", str(args.max_tokens), "--max-update", str(args.updates),
           "--cpu", "--num-workers", "0", "--seed", "1", "--log-format", "simple",
           "--log-interval", "1", "--disable-validation", "--no-save"]
    if args.adaptive_softmax_cutoff:
        cmd += ["--adaptive-softmax-cutoff", args.adaptive_softmax_cutoff]
    if not args.no_recompute:
        cmd.append("--moe-recompute")
    cmd += args.extra.split()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    log_dir = os.path.join(ROOT, "outputs", "memory_train")
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"{arch}.{optimizer}.log")
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - start
    text = open(log_path).read()
    if proc.returncode != 0:
        raise SystemExit(f"fairseq-train --arch {arch} --optimizer {optimizer} failed (exit "
                         f"{proc.returncode}); the end of {log_path}:\n"
                         + "\n".join(text.splitlines()[-25:]))
    import re

    losses = [float(x) for x in re.findall(r"train_inner \| .*? loss=([\d.]+)", text)]
    return {"arch": arch, "optimizer": optimizer, "peak_rss": usage.ru_maxrss * 1024,
            "wall_s": wall, "losses": losses, "log": log_path, "command": " ".join(cmd)}


def main(argv=None):
    args = parse_args(argv)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    worker_counts = [int(w) for w in args.workers.split(",")]
    result = {"args": vars(args)}
    rows = [account(a, args.vocab, args.adaptive_softmax_cutoff) for a in archs]
    print_accounting(rows, worker_counts)
    result["accounting"] = rows
    if args.gpu_table:
        result["gpu_table"] = gpu_table(rows, worker_counts,
                                        [float(m) for m in args.gpu_memory.split(",")],
                                        args.activation_share)
    optimizers = [o.strip() for o in args.measure.split(",") if o.strip()]
    if optimizers:
        from fairseq.data import Dictionary

        vocab = len(Dictionary.load(os.path.join(args.data, "dict.txt")))
        measured = []
        for arch in archs:
            row = account(arch, vocab, args.adaptive_softmax_cutoff)
            b = per_worker(row, 1)
            for optimizer in optimizers:
                print(f"[memory_train] fairseq-train --arch {arch} --optimizer {optimizer}, "
                      f"{args.updates} updates ...", file=sys.stderr, flush=True)
                run = measure(arch, optimizer, args)
                run["accounted_bytes"] = {"params": b["params"], "grads": b["grads"],
                                          "optimizer": b[optimizer]}
                measured.append(run)
                state = b["params"] + b["grads"] + b[optimizer]
                recompute = "no recompute" if args.no_recompute else "--moe-recompute"
                print(f"\n{arch} --optimizer {optimizer} ({recompute}"
                      f", vocabulary {vocab:,}, {args.updates} updates of {args.max_tokens} tokens)\n"
                      f"  parameters {b['params'] / GIB:.2f} GiB, gradients {b['grads'] / GIB:.2f} GiB, "
                      f"optimizer state {b[optimizer] / GIB:.2f} GiB: {state / GIB:.2f} GiB\n"
                      f"  peak RSS {run['peak_rss'] / GIB:.2f} GiB (the rest: activations, data, "
                      f"fairseq/torch: {(run['peak_rss'] - state) / GIB:.2f} GiB); losses "
                      f"{run['losses']}; {run['wall_s']:.0f} s", flush=True)
                if optimizer == "smoe_adam" and "adam" not in optimizers:
                    # fairseq's Adam step also makes a temporary (its √v + ε) of each tensor's
                    # size in turn: the largest one adds to the peak (smoe_adam works in blocks)
                    extra, temp = b["adam"] - b["smoe_adam"], 4 * row["largest_param"]
                    print(f"  Adam would hold {extra / GIB:.2f} GiB more optimizer state, and its "
                          f"step a temporary of the largest tensor ({temp / GIB:.2f} GiB): peak "
                          f"about {(run['peak_rss'] + extra + temp) / GIB:.2f} GiB")
        result["measured"] = measured
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
