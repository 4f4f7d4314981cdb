#!/usr/bin/env bash
# smoe_adam against Adam on the demo budget: the recipe of scripts/demo.sh
# (lstm_moe_lm_wikitext2_demo, WikiText-2, $SMOE_DEMO_UPDATES = 300 updates of 2048 tokens,
# seed 1), trained once per optimizer, one after the other, then test perplexity with
# fairseq-eval-lm on the full test split. Outputs: outputs/optimizer_quality/{adam,smoe_adam}/.
#
#   bash scripts/optimizer_quality.sh              # both (about 10 minutes on 2 cores)
#   bash scripts/optimizer_quality.sh smoe_adam    # one of them
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
updates="${SMOE_DEMO_UPDATES:-300}"
data="outputs/data/wikitext-2/bin"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${OMP_NUM_THREADS:-1}"
[ -f "$data/dict.txt" ] || bash scripts/prepare-wikitext2.sh
optimizers=("$@")
[ ${#optimizers[@]} -gt 0 ] || optimizers=(adam smoe_adam)
for optimizer in "${optimizers[@]}"; do
  out="outputs/optimizer_quality/$optimizer"
  rm -rf "$out"
  mkdir -p "$out"
  echo "==> $optimizer: training ($out/train.log)"
  .venv/bin/fairseq-train "$data" --user-dir fairseq_smoe --task language_modeling \
    --arch lstm_moe_lm_wikitext2_demo --criterion smoe_cross_entropy \
    --optimizer "$optimizer" --adam-betas '(0.9,0.98)' --lr 0.004 --lr-scheduler inverse_sqrt \
    --warmup-updates 50 --warmup-init-lr 1e-7 --clip-norm 1.0 \
    --tokens-per-sample 64 --sample-break-mode none --max-tokens 2048 --max-update "$updates" \
    --cpu --num-workers 0 --seed 1 --log-format simple --log-interval 25 \
    --save-dir "$out/checkpoints" --no-epoch-checkpoints --disable-validation \
    > "$out/train.log" 2>&1 || { tail -n 30 "$out/train.log" >&2; exit 1; }
  grep -E "train_inner" "$out/train.log" | tail -n 1 | grep -oE "num_updates=[0-9]+|loss=[0-9.]+|ppl=[0-9.]+" | paste -sd ' '
  .venv/bin/fairseq-eval-lm "$data" --user-dir fairseq_smoe --path "$out/checkpoints/checkpoint_last.pt" \
    --gen-subset test --tokens-per-sample 64 --max-tokens 8192 --cpu > "$out/eval-test.log" 2>&1 \
    || { tail -n 30 "$out/eval-test.log" >&2; exit 1; }
  ppl=$(grep -o "Perplexity: [0-9.]*" "$out/eval-test.log" | grep -o "[0-9.]*$")
  echo "$optimizer test perplexity $ppl" | tee "$out/summary.txt"
done
