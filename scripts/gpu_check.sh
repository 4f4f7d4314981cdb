#!/usr/bin/env bash
# One command for the day a GPU is lent (issue 12): the GPU path's checks and figures, in under
# 8 minutes on one H100/H200. Nothing here downloads anything: it uses the Python that has a
# CUDA torch (PYTHON, else .venv/bin/python, else python3) and the working tree as it is.
#
#   bash scripts/gpu_check.sh [OUT_DIR]          # default OUT_DIR: outputs/gpu_check
#
# Steps (each with its own time limit; a failing step is recorded and the next one runs):
#   1. pytest -m gpu tests/test_moe_backends.py   the CPU suite's backend tests on CUDA, Triton
#                                                 compiled (TRITON_INTERPRET=0)
#   2. sync debug   torch.cuda.set_sync_debug_mode("error") over one training step of a flat and
#                   a hierarchical layer per backend (grouped_mm, triton) and dtype (fp32, fp16,
#                   bf16): a device-resident step must not synchronise
#   3. benchmark_moe.py --devices cuda: MoE-32/256/256-h/1024-h at 8192 tokens in fp32, fp16,
#                   bf16 against the dense layer (backend auto), with the launch/sync proxy
#   4. fairseq-train --arch lstm_moe_lm_1b_moe_256_h, 20 updates each in fp32, --fp16, --amp
#                   and --bf16 (fairseq's synthetic dummy_lm task; --bf16 is CUDA bf16 through
#                   the plugin's BF16_CUDA patch: fairseq 0.12 alone reads it as TPU training)
#   5. with >= 2 GPUs: 20 expert-parallel updates under torchrun
# It writes OUT_DIR/gpu_check.json (every step: status, seconds, figures) and
# OUT_DIR/gpu_check.md (tables ready for docs/performance.md), logs in OUT_DIR/logs/.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="$(mkdir -p "${1:-outputs/gpu_check}" && cd "${1:-outputs/gpu_check}" && pwd)"
mkdir -p "$out/logs"
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
export TRITON_INTERPRET=0 SMOE_TEST_GPU=1 PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
steps="$out/steps.jsonl"
: > "$steps"
say() { echo "[gpu_check] $*" >&2; }

if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  say "no CUDA device visible to $py: nothing to check"
  exit 2
fi
"$py" - > "$out/logs/device.txt" <<'PY'
import torch
print(torch.__version__, torch.version.cuda, torch.cuda.device_count(), torch.cuda.get_device_name(0),
      torch.cuda.get_device_capability(0))
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton missing")
PY
say "device: $(cat "$out/logs/device.txt" | tr '\n' ' ')"

# step NAME LIMIT_S COMMAND...: runs it, logs to logs/NAME.log, appends a JSON line to steps.
step() {
  local name="$1" limit="$2"; shift 2
  local start end status
  say "$name (limit ${limit}s)"
  start=$(date +%s.%N)
  timeout "$limit" "$@" > "$out/logs/$name.log" 2>&1
  status=$?
  end=$(date +%s.%N)
  "$py" -c "import json,sys; print(json.dumps({'step': sys.argv[1], 'exit': int(sys.argv[2]), 'seconds': round(float(sys.argv[4]) - float(sys.argv[3]), 1), 'log': sys.argv[5]}))" \
    "$name" "$status" "$start" "$end" "logs/$name.log" >> "$steps"
  [ "$status" = 0 ] && say "$name: ok" || say "$name: FAILED (exit $status), see $out/logs/$name.log"
}

step pytest_gpu 120 "$py" -m pytest -q -p no:cacheprovider -m gpu -o addopts="" tests/test_moe_backends.py

cat > "$out/logs/sync_debug.py" <<'PY'
import json, sys
import torch
from fairseq_smoe.modules import HierarchicalMoELayer, MoELayer
results = []
for backend in ("grouped_mm", "triton"):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for kind in ("flat", "hierarchical"):
            torch.manual_seed(0)
            layer = (MoELayer(512, 512, 256, 1024, k=4, backend=backend) if kind == "flat" else
                     HierarchicalMoELayer(512, 512, 16, 16, 1024, backend=backend))
            layer = layer.cuda().to(dtype).train()
            x = torch.randn(8192, 512, device="cuda", dtype=dtype, requires_grad=True)
            mask = torch.zeros(8192, dtype=torch.bool, device="cuda"); mask[-100:] = True
            case = {"backend": backend, "dtype": str(dtype).replace("torch.", ""), "kind": kind}
            try:
                for debug in (False, True):  # warm-up (compilation), then the checked step
                    torch.cuda.set_sync_debug_mode("error" if debug else "default")
                    y, stats = layer(x, mask)
                    (y.float().square().mean() + stats.loss).backward()
                torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize()
                case["synchronises"] = False
            except Exception as error:  # noqa: BLE001 - recorded
                torch.cuda.set_sync_debug_mode("default")
                case["synchronises"] = True
                case["error"] = str(error).splitlines()[0][:300]
            results.append(case)
            print(json.dumps(case), flush=True)
json.dump(results, open(sys.argv[1], "w"), indent=1)
sys.exit(0 if all(not c["synchronises"] for c in results if not
                  (c["backend"] == "grouped_mm" and c["dtype"] != "bfloat16")) else 1)
PY
step sync_debug 60 "$py" "$out/logs/sync_debug.py" "$out/sync_debug.json"

step benchmark 120 "$py" scripts/benchmark_moe.py --devices cuda \
  --configs moe-32,moe-256,moe-256-h,moe-1024-h --tokens 8192 --dtypes fp32,fp16,bf16 \
  --reps 5 --warmup 2 --json "$out/benchmark.json"

train() {  # train NAME EXTRA...: 20 updates of the MoE-256-h LM preset on synthetic data
  local name="$1"; shift
  step "$name" 50 "$py" -m fairseq_cli.train --task dummy_lm --dict-size 50000 --dataset-size 100000 \
    --user-dir "$root/fairseq_smoe" --arch lstm_moe_lm_1b_moe_256_h --criterion smoe_cross_entropy \
    --adaptive-softmax-cutoff 10000,20000 --tokens-per-sample 256 --max-tokens 8192 \
    --optimizer adam --lr 1e-3 --max-update 20 --log-format simple --log-interval 5 \
    --no-progress-bar --num-workers 0 --disable-validation --no-save "$@"
}
train train_fp32
train train_fp16 --fp16
train train_amp --amp
train train_bf16 --bf16  # CUDA bf16 through the BF16_CUDA patch (fairseq 0.12 alone: TPU)

gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -ge 2 ]; then
  step train_expert_parallel 60 "$py" -m torch.distributed.run --nproc_per_node 2 -m fairseq_cli.train \
    --task dummy_lm --dict-size 50000 --dataset-size 100000 --user-dir "$root/fairseq_smoe" \
    --arch lstm_moe_lm_1b_moe_256_h --criterion smoe_cross_entropy \
    --adaptive-softmax-cutoff 10000,20000 --tokens-per-sample 256 --max-tokens 8192 \
    --optimizer adam --lr 1e-3 --max-update 20 --log-format simple --log-interval 5 \
    --no-progress-bar --num-workers 0 --disable-validation --no-save --distributed-world-size 2
else
  say "one GPU: the expert-parallel torchrun step needs 2"
fi

"$py" - "$out" <<'PY'
import json, os, re, sys
out = sys.argv[1]
steps = [json.loads(line) for line in open(os.path.join(out, "steps.jsonl"))]
summary = {"device": open(os.path.join(out, "logs", "device.txt")).read().strip(), "steps": steps}
md = [f"GPU check on {summary['device']}", "", "| step | exit | seconds |", "|---|---|---|"]
md += [f"| {s['step']} | {s['exit']} | {s['seconds']} |" for s in steps]
for s in steps:  # words/s of the fairseq-train runs (last logged interval)
    if s["step"].startswith("train"):
        wps = re.findall(r"wps=([0-9.]+)", open(os.path.join(out, s["log"])).read())
        s["wps"] = float(wps[-1]) if wps else None
path = os.path.join(out, "sync_debug.json")
if os.path.exists(path):
    summary["sync_debug"] = json.load(open(path))
    md += ["", "| backend | dtype | layer | synchronises |", "|---|---|---|---|"]
    md += [f"| {c['backend']} | {c['dtype']} | {c['kind']} | {'yes' if c['synchronises'] else 'no'} |"
           for c in summary["sync_debug"]]
path = os.path.join(out, "benchmark.json")
if os.path.exists(path):
    rows = json.load(open(path))["rows"]
    summary["benchmark"] = rows
    md += ["", "| config | dtype | backend | dense ms | MoE ms | ratio | reads loop/gmm/triton | "
           "kernels loop/gmm/triton |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r.get("proxy", {})
        reads = "/".join(str(p.get(b, {}).get("host_reads", "-")) for b in ("loop", "grouped_mm", "triton"))
        kernels = "/".join(str(p.get(b, {}).get("kernels", "-")) for b in ("loop", "grouped_mm", "triton"))
        md.append(f"| {r['config']} | {r['dtype']} | {r['backend']} | {r['dense_ms']:.2f} | "
                  f"{r['moe_ms']:.2f} | {r['ratio']:.2f} | {reads} | {kernels} |")
trains = [s for s in steps if s["step"].startswith("train")]
if trains:
    md += ["", "| fairseq-train (MoE-256-h, 20 updates) | exit | words/s |", "|---|---|---|"]
    md += [f"| {s['step']} | {s['exit']} | {s.get('wps')} |" for s in trains]
json.dump(summary, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
open(os.path.join(out, "gpu_check.md"), "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
say "wrote $out/gpu_check.json and $out/gpu_check.md"
