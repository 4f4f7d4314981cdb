#!/usr/bin/env bash
# Equal-compute comparison on WikiText-2 (the demo's budget): the demo LSTM-MoE model against
#   - dense3x:  the same network with the MoE replaced by a third 256-unit LSTM (the "4xLSTM-512"
#               construction of App. C at this width: k=2 experts 256→512→256 cost exactly one
#               256-unit LSTM layer, 0.52M multiply-adds per token), and
#   - lstm_lm:  fairseq's own lstm_lm, 3 layers of 256, no residuals (its defaults), same
#               adaptive softmax cutoffs.
# All three: same data order (seed), same tokens per update, same number of updates, same
# optimiser and schedule; then fairseq-eval-lm on the full test set. lstm_lm runs with
# --user-dir fairseq_smoe too: the plugin's patches (docs/compat.md) apply to every model in the
# process, and batching_compat's kept last batch changes the batch count and data order, so a
# run without the plugin would not see the same batches.
#
#   bash examples/language_model/compare_wikitext2.sh [UPDATES]     (default 300, as the demo)
# Results: outputs/lm-compare/summary.md. Runs the three trainings in parallel, one thread each.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
updates="${1:-300}"
out="outputs/lm-compare"
bash scripts/bootstrap.sh
bash scripts/prepare-wikitext2.sh
data="outputs/data/wikitext-2/bin"
mkdir -p "$out"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

common=(--task language_modeling --optimizer adam --adam-betas '(0.9,0.98)' --lr 0.004
        --lr-scheduler inverse_sqrt --warmup-updates 50 --warmup-init-lr 1e-7 --clip-norm 1.0
        --tokens-per-sample 64 --sample-break-mode none --max-tokens 2048 --max-update "$updates"
        --cpu --num-workers 0 --seed 1 --log-format simple --log-interval 25
        --no-epoch-checkpoints --no-last-checkpoints)
declare -A model
model[moe]="--user-dir fairseq_smoe --arch lstm_moe_lm_wikitext2_demo --criterion smoe_cross_entropy"
model[dense3x]="--user-dir fairseq_smoe --arch lstm_moe_lm_wikitext2_demo --moe-num-experts 0
  --lstm-layers-before-moe 2 --lstm-layers-after-moe 1 --criterion smoe_cross_entropy"
model[lstm_lm]="--user-dir fairseq_smoe --arch lstm_lm --decoder-layers 3 --decoder-embed-dim 256 --decoder-hidden-size 256
  --decoder-out-embed-dim 256 --dropout 0.1 --criterion adaptive_loss --ddp-backend legacy_ddp
  --adaptive-softmax-cutoff 2000,10000"
for name in moe dense3x lstm_lm; do
  echo "[compare] training $name for $updates updates → $out/$name.log" >&2
  # shellcheck disable=SC2086
  .venv/bin/fairseq-train "$data" "${common[@]}" ${model[$name]} --save-dir "$out/$name" \
    > "$out/$name.log" 2>&1 &
done
wait
{
  echo "| model | valid ppl (fairseq-train) | test ppl (fairseq-eval-lm) | train wall (s) |"
  echo "|---|---|---|---|"
  for name in moe dense3x lstm_lm; do
    valid=$(grep -o "valid on 'valid' subset.*| ppl [0-9.]*" "$out/$name.log" | tail -1 | grep -o "ppl [0-9.]*$" | cut -d' ' -f2)
    wall=$(grep -o "done training in [0-9.]*" "$out/$name.log" | grep -o "[0-9.]*$")
    test=$(.venv/bin/fairseq-eval-lm "$data" --user-dir fairseq_smoe --path "$out/$name/checkpoint_best.pt" \
             --gen-subset test --tokens-per-sample 64 --max-tokens 8192 --cpu 2>&1 \
           | grep -o "Perplexity: [0-9.]*" | cut -d' ' -f2)
    echo "| $name | $valid | $test | $wall |"
  done
} | tee "$out/summary.md"
