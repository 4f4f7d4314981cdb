#!/usr/bin/env bash
# One command for the day a GPU is lent (issues 12 and 26): the GPU path's checks and figures,
# within 6 minutes on one H100/H200, on a machine with no network. Nothing here downloads
# anything: it uses the Python that has a CUDA torch (PYTHON, else .venv/bin/python, else
# python3), the working tree as it is, and, where that Python cannot import fairseq, the wheel
# bundle in .whl/ (scripts/build_device_bundle.sh; carried by the device tool). docs/gpu.md
# says how to build, rehearse and run it.
#
#   bash scripts/gpu_check.sh [OUT_DIR]               # default OUT_DIR: outputs/gpu_check
#   bash scripts/gpu_check.sh --rehearsal [OUT_DIR]   # the same logic on CPU, tiny sizes
#
# Steps (each with its own time limit, all within a budget of SMOE_GPU_CHECK_BUDGET_S, default
# 330 s; a failing step is recorded and the next one runs; one that cannot start before the
# budget ends is recorded as skipped):
#   bundle        install .whl/ into outputs/device-site (only if fairseq does not import)
#   import_check  fairseq, the plugin, and which of fairseq's compiled extensions load
#   pytest_gpu    pytest -m gpu tests/test_module_backends.py: the backend tests on CUDA, Triton
#                 compiled (TRITON_INTERPRET=0); rehearsal: --collect-only
#   sync_debug    torch.cuda.set_sync_debug_mode("warn") over one training step of a flat and a
#                 hierarchical layer per backend (loop, grouped_mm, triton) and dtype (fp32,
#                 fp16, bf16): every sync counted with its file:line in fairseq_smoe
#   benchmark     benchmark_moe.py --devices cuda: MoE-32/256/256-h/1024-h at 8192 tokens in
#                 bf16, fp32, fp16 against the dense layer, with the launch/sync proxy; each row
#                 is written as it finishes and a failing row does not stop the others
#   train_*       fairseq-train --arch lstm_moe_lm_1b_moe_256_h, 20 updates each in fp32, --fp16,
#                 --amp and --bf16 (fairseq's synthetic dummy_lm task; --bf16 is CUDA bf16
#                 through the plugin's BF16_CUDA patch: fairseq 0.12 alone reads it as TPU);
#                 rehearsal: 2 tiny updates with --cpu in fp32 (the others need CUDA)
#   train_expert_parallel   with >= 2 GPUs: 20 expert-parallel updates under torchrun
# It writes OUT_DIR/gpu_check.json (every step: status, seconds, figures), OUT_DIR/gpu_check.md
# (tables for docs/performance.md), logs in OUT_DIR/logs/. When OUT is set (the device tool sets
# it), it also writes exactly two files there: gpu_check.tar.gz (all of OUT_DIR) and
# gpu_check_summary.json. Exit status: 0 when every step passed (or was skipped by design).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
say() { echo "[gpu_check] $*" >&2; }

rehearsal=0
out_arg=""
for arg in "$@"; do
  case "$arg" in
    --rehearsal) rehearsal=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) say "error: unknown option '$arg' (use --rehearsal, --help or an output folder)"; exit 2 ;;
    *) out_arg="$arg" ;;
  esac
done
if [ -z "$out_arg" ]; then
  out_arg=outputs/gpu_check
  [ "$rehearsal" = 1 ] && out_arg=outputs/gpu_check-rehearsal
fi
work="$(mkdir -p "$out_arg" && cd "$out_arg" && pwd)"
# This run's results only: the tarball takes the whole folder.
rm -rf "$work/logs" "$work/steps.jsonl" "$work/meta.json" "$work/gpu_check.json" "$work/gpu_check.md" \
  "$work/import_check.json" "$work/sync_debug.json" "$work/benchmark.json"
mkdir -p "$work/logs"
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
helper="$root/scripts/gpu_check_summary.py"
steps="$work/steps.jsonl"
: > "$steps"
t0=$(date +%s)
budget="${SMOE_GPU_CHECK_BUDGET_S:-330}"
deadline=$((t0 + budget))
# Rehearsal: Triton runs in its interpreter on CPU (sync_debug's triton cases).
export TRITON_INTERPRET=$(( rehearsal ? 1 : 0 )) SMOE_TEST_GPU=1
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
fairseq_ok=1

record() {  # record NAME STATUS NOTE [LOG]: a step that did not run
  "$py" "$helper" record "$steps" "$1" 0 0 0 "${4:-logs/$1.log}" --status "$2" --note "$3"
  say "$1: $2 ($3)"
}

# step NAME LIMIT_S COMMAND...: runs it under its limit (cut to what is left of the budget),
# logs to logs/NAME.log, appends a JSON line to steps.jsonl.
step() {
  local name="$1" limit="$2"; shift 2
  local left start end status
  left=$((deadline - $(date +%s)))
  if [ "$left" -lt 15 ]; then
    record "$name" skipped "deadline: ${left}s left of the ${budget}s budget"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "$name (limit ${limit}s, ${left}s of the budget left)"
  start=$(date +%s.%N)
  # --kill-after: a process that ignores TERM (a hung CUDA call) still ends.
  timeout --kill-after=10 "$limit" "$@" > "$work/logs/$name.log" 2>&1
  status=$?
  end=$(date +%s.%N)
  "$py" "$helper" record "$steps" "$name" "$status" "$start" "$end" "logs/$name.log"
  if [ "$status" = 0 ]; then say "$name: ok ($(awk "BEGIN{printf \"%.0f\", $end - $start}")s)"
  else say "$name: FAILED (exit $status), see $work/logs/$name.log"; fi
  return "$status"
}

# ---- the device
if [ "$rehearsal" = 1 ]; then
  say "REHEARSAL on CPU: every step that needs no CUDA, tiny sizes"
  "$py" -c 'import platform, sys, torch; print("CPU", platform.machine(), "python", sys.version.split()[0], "torch", torch.__version__)' \
    > "$work/logs/device.txt" 2>&1
else
  "$py" - > "$work/logs/device.txt" 2>&1 <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    print(f"no CUDA device visible to {sys.executable} (torch {torch.__version__})")
    sys.exit(1)
print(torch.__version__, torch.version.cuda, torch.cuda.device_count(), torch.cuda.get_device_name(0),
      torch.cuda.get_device_capability(0))
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton missing")
PY
  if [ $? != 0 ]; then
    say "$(tail -1 "$work/logs/device.txt"): nothing to check (on a CPU machine: --rehearsal)"
    record device failed "$(tail -1 "$work/logs/device.txt")" logs/device.txt
    "$py" "$helper" summary "$work" ${OUT:+--out "$OUT"} > /dev/null
    exit 2
  fi
fi
say "device: $(tr '\n' ' ' < "$work/logs/device.txt")"

# ---- fairseq: the device has none; the bundle brings it (and its configuration stack)
if "$py" -c 'import fairseq' > /dev/null 2>&1; then
  record bundle skipped "fairseq already importable by $py"
elif [ ! -f "$root/.whl/MANIFEST.txt" ]; then
  say "error: $py cannot import fairseq and there is no .whl/MANIFEST.txt: run 'bash scripts/build_device_bundle.sh' and carry .whl"
  record bundle failed "no .whl/: run bash scripts/build_device_bundle.sh and carry .whl"
  fairseq_ok=0
else
  site="${SMOE_BUNDLE_SITE:-$root/outputs/device-site}"
  step bundle 60 "$py" "$helper" install-bundle "$root/.whl" "$site" || fairseq_ok=0
  export PYTHONPATH="$PYTHONPATH:$site"
fi
if [ "$fairseq_ok" = 1 ]; then
  step import_check 60 "$py" "$helper" probe-imports "$work/import_check.json" || fairseq_ok=0
else
  record import_check skipped "no fairseq (see the bundle step)"
fi

# ---- the layer's tests on CUDA
xdist=()
# pytest-xdist (on the device's image): Triton compiles the kernels of 82 tests on 4 processes.
"$py" -c 'import xdist' > /dev/null 2>&1 && xdist=(-n 4)
pytest_args=(-q -p no:cacheprovider -m gpu -o addopts="" --durations=10 "${xdist[@]}" tests/test_module_backends.py)
if [ "$rehearsal" = 1 ]; then
  step pytest_gpu 60 "$py" -m pytest --collect-only "${pytest_args[@]}"
else
  step pytest_gpu 75 "$py" -m pytest "${pytest_args[@]}"
fi

# ---- host syncs of a training step
step sync_debug 50 "$py" "$helper" sync-debug "$work/sync_debug.json" $( [ "$rehearsal" = 1 ] && echo --cpu )

# ---- the benchmark (bf16 first: the dtype the GPU backends are chosen for on 9.x)
if [ "$rehearsal" = 1 ]; then
  step benchmark 60 "$py" scripts/benchmark_moe.py --devices cpu --configs moe-32,moe-64-h --groups 4 \
    --tokens 256 --dim 32 --hidden 64 --dtypes bf16,fp32 --reps 2 --warmup 1 --json "$work/benchmark.json"
else
  step benchmark 75 "$py" scripts/benchmark_moe.py --devices cuda \
    --configs moe-32,moe-256,moe-256-h,moe-1024-h --tokens 8192 --dtypes bf16,fp32,fp16 \
    --reps 5 --warmup 2 --json "$work/benchmark.json"
fi

# ---- fairseq-train
train_args=(--task dummy_lm --user-dir "$root/fairseq_smoe" --arch lstm_moe_lm_1b_moe_256_h
            --criterion smoe_cross_entropy --optimizer adam --lr 1e-3 --log-format simple
            --no-progress-bar --num-workers 0 --disable-validation --no-save)
if [ "$rehearsal" = 1 ]; then  # the same model with tiny widths, a 1000-word dictionary
  train_args+=(--dict-size 1000 --dataset-size 1000 --adaptive-softmax-cutoff 200,500
               --tokens-per-sample 32 --max-tokens 256 --max-update 2 --log-interval 1 --cpu
               --decoder-embed-dim 32 --decoder-hidden-size 32 --moe-hidden-dim 32)
else  # 20 updates of the MoE-256-h LM preset on synthetic data
  train_args+=(--dict-size 50000 --dataset-size 100000 --adaptive-softmax-cutoff 10000,20000
               --tokens-per-sample 256 --max-tokens 8192 --max-update 20 --log-interval 5)
fi
train() {  # train NAME EXTRA...
  local name="$1"; shift
  if [ "$fairseq_ok" != 1 ]; then record "$name" skipped "no fairseq (see the bundle and import_check steps)"; return; fi
  step "$name" 35 "$py" -m fairseq_cli.train "${train_args[@]}" "$@"
}
train train_fp32
if [ "$rehearsal" = 1 ]; then
  record train_fp16 skipped "needs CUDA (rehearsal on CPU)"
else
  train train_fp16 --fp16
fi
if [ "$rehearsal" = 1 ]; then
  record train_amp skipped "needs CUDA (rehearsal on CPU; the plugin refuses --amp there)"
else
  train train_amp --amp
fi
if [ "$rehearsal" = 1 ]; then
  record train_bf16 skipped "needs CUDA (rehearsal on CPU; fairseq 0.12 reads --bf16 as TPU there)"
else
  train train_bf16 --bf16  # CUDA bf16 through the BF16_CUDA patch (fairseq 0.12 alone: TPU)
fi

gpus=0
[ "$rehearsal" = 1 ] || gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "$gpus" -ge 2 ] && [ "$fairseq_ok" = 1 ]; then
  step train_expert_parallel 60 "$py" -m torch.distributed.run --nproc_per_node 2 -m fairseq_cli.train \
    "${train_args[@]}" --distributed-world-size 2
else
  record train_expert_parallel skipped "needs 2 GPUs (this machine: $gpus)"
fi

# ---- the summary
"$py" - "$work/meta.json" "$rehearsal" "$budget" "$(( $(date +%s) - t0 ))" "$py" <<'PY'
import json, sys
path, rehearsal, budget, seconds, python = sys.argv[1:]
json.dump({"rehearsal": rehearsal == "1", "budget_s": int(budget), "total_s": int(seconds),
           "python": python}, open(path, "w"))
PY
"$py" "$helper" summary "$work" ${OUT:+--out "$OUT"}
summary_status=$?
say "took $(( $(date +%s) - t0 ))s; wrote $work/gpu_check.json and $work/gpu_check.md${OUT:+; in $OUT: gpu_check.tar.gz, gpu_check_summary.json}"
[ "$summary_status" = 0 ] || exit "$summary_status"
"$py" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["ok"] else 1)' "$work/gpu_check.json"
