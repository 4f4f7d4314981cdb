#!/usr/bin/env python
"""Training words/s of the LM presets with fairseq-train: MoE-32 against the MoE-1-Wide baseline.

End to end, the MoE-32 language model (§5.1: LSTM → MoE of 32 experts of
hidden 1024, k = 4 → LSTM) must reach at least 0.9× the training words/s of its computationally
matched baseline MoE-1-Wide (one expert of hidden 4096). Both run the same fairseq-train command
on the same data for a fixed number of updates, alternating (baseline, MoE, baseline, MoE, ...)
so that both see the same machine load; words/s is the median over the logged intervals after
the first (start-up) one, and over rounds.

    .venv/bin/python scripts/benchmark_train.py                       # WikiText-2, 8192 tokens/batch
    .venv/bin/python scripts/benchmark_train.py --quick               # tiny presets, a smoke run
    .venv/bin/python scripts/benchmark_train.py --archs lstm_moe_lm_1b_moe_1_wide,lstm_moe_lm_1b_moe_256

The data is WikiText-2 as scripts/prepare-wikitext2.sh binarizes it (run first if missing);
the 1B-Word presets' adaptive-softmax cutoffs are replaced by ones that fit its 33k vocabulary
(the softmax is the same for all presets, so the ratio still isolates the MoE layer's cost).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(ROOT, "outputs", "data", "wikitext-2", "bin")
TARGET = 0.9  # MoE words/s over baseline words/s


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="lstm_moe_lm_1b_moe_1_wide,lstm_moe_lm_1b_moe_32",
                   help="comma-separated lstm_moe_lm presets; the first is the baseline")
    p.add_argument("--data", default=DEFAULT_DATA, help="fairseq language_modeling data dir")
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens per batch (= MoE batch)")
    p.add_argument("--tokens-per-sample", type=int, default=128)
    p.add_argument("--updates", type=int, default=30, help="updates per run")
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="runs per preset, alternating")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for fairseq-train")
    p.add_argument("--adaptive-softmax-cutoff", default="10000,20000",
                   help="replaces the 1B-Word presets' cutoffs (must be below the vocabulary)")
    p.add_argument("--extra", default="", help="more fairseq-train arguments, one string")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny presets, 1024 tokens, 6 updates, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.archs = "lstm_moe_lm_tiny_4xlstm,lstm_moe_lm_tiny"
        args.max_tokens, args.tokens_per_sample, args.updates = 1024, 64, 6
        args.log_interval, args.rounds, args.adaptive_softmax_cutoff = 2, 1, "2000,10000"
    return args


def fairseq_train() -> str:
    exe = os.path.join(ROOT, ".venv", "bin", "fairseq-train")
    if not os.path.exists(exe):
        raise SystemExit(f"{exe} not found: run 'bash scripts/bootstrap.sh' first")
    return exe


def ensure_data(data: str):
    if os.path.exists(os.path.join(data, "dict.txt")):
        return
    if os.path.abspath(data) != DEFAULT_DATA:
        raise SystemExit(f"{data} has no dict.txt: give --data a fairseq language_modeling data dir")
    print("[benchmark_train] preparing WikiText-2 (scripts/prepare-wikitext2.sh)", file=sys.stderr)
    subprocess.run(["bash", os.path.join(ROOT, "scripts", "prepare-wikitext2.sh")], check=True)


def run_once(arch: str, args, log_path: str) -> dict:
    cmd = [fairseq_train(), args.data, "--user-dir", os.path.join(ROOT, "fairseq_smoe"),
           "--task", "language_modeling", "--arch", arch, "--criterion", "smoe_cross_entropy",
           "--adaptive-softmax-cutoff", args.adaptive_softmax_cutoff,
           "--optimizer", "adam", "--lr", "0.001", "--lr-scheduler", "inverse_sqrt",
           "--warmup-updates", "100", "--clip-norm", "1.0",
           "--tokens-per-sample", str(args.tokens_per_sample), "--sample-break-mode", "none",
           "--max-tokens", str(args.max_tokens), "--max-update", str(args.updates),
           "--cpu", "--num-workers", "0", "--seed", "1", "--log-format", "simple",
           "--log-interval", str(args.log_interval), "--disable-validation", "--no-save"]
    cmd += args.extra.split()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - start
    text = open(log_path).read()
    if proc.returncode != 0:
        raise SystemExit(f"fairseq-train --arch {arch} failed (exit {proc.returncode}); the end of "
                         f"{log_path}:\n" + "\n".join(text.splitlines()[-25:]))
    wps = [float(m) for m in re.findall(r"train_inner.*?\bwps=([\d.]+)", text)]
    if not wps:  # older log format: "| wps ..." or "wps=" without the train_inner tag
        wps = [float(m) for m in re.findall(r"\bwps[= ]([\d.]+)", text)]
    steady = wps[1:] if len(wps) > 1 else wps
    return {"arch": arch, "wps_intervals": wps, "wps": statistics.median(steady) if steady else None,
            "wall_s": wall, "log": log_path}


def main(argv=None):
    args = parse_args(argv)
    ensure_data(args.data)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    if len(archs) < 2:
        raise SystemExit("--archs needs a baseline and at least one preset to compare")
    log_dir = os.path.join(ROOT, "outputs", "benchmark_train")
    os.makedirs(log_dir, exist_ok=True)
    load_start = os.getloadavg()
    print(f"[benchmark_train] {len(archs)} presets × {args.rounds} rounds, {args.updates} updates of "
          f"{args.max_tokens} tokens, {args.threads} threads, load average {load_start}", file=sys.stderr)
    runs = {a: [] for a in archs}
    for r in range(args.rounds):
        for arch in archs:
            res = run_once(arch, args, os.path.join(log_dir, f"{arch}.round{r}.log"))
            runs[arch].append(res)
            print(f"[benchmark_train] round {r + 1}: {arch:32s} {res['wps'] or float('nan'):9.0f} words/s "
                  f"({res['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    summary = []
    for arch in archs:
        values = [x["wps"] for x in runs[arch] if x["wps"] is not None]
        summary.append({"arch": arch, "wps": statistics.median(values) if values else None,
                        "rounds": [x["wps"] for x in runs[arch]]})
    base = summary[0]["wps"]
    print(f"{'preset':34s}{'words/s':>10}{'vs ' + archs[0]:>40}")
    for row in summary:
        row["ratio"] = row["wps"] / base if row["wps"] and base else None
        mark = ""
        if row is not summary[0] and row["ratio"] is not None:
            mark = "  (target >= 0.9: " + ("met" if row["ratio"] >= TARGET else "MISSED") + ")"
        wps, ratio = row["wps"] or float("nan"), row["ratio"] or float("nan")
        print(f"{row['arch']:34s}{wps:>10.0f}{ratio:>40.3f}{mark}")
    load_end = os.getloadavg()
    print(f"[benchmark_train] load average at the end {load_end}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "loadavg": [load_start, load_end], "summary": summary,
                       "runs": runs}, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
