#!/usr/bin/env bash
# The demo: train an LSTM-MoE language model on WikiText-2 on CPU, evaluate its test
# perplexity with fairseq-eval-lm, and show how the tokens spread over the experts.
#
#   bash scripts/demo.sh            (about 4-5 minutes on 2 free cores, after the venv exists)
#
# 1. scripts/bootstrap.sh creates/refreshes .venv.
# 2. scripts/prepare-wikitext2.sh checks and binarizes the WikiText-2 copy shipped in
#    data/wikitext-2/ (full vocabulary, 33,280 entries with fairseq's specials).
# 3. fairseq-train, --arch lstm_moe_lm_wikitext2_demo: embedding 256 → LSTM 256 → MoE of 16
#    experts (256→512→256, noisy top-2 gating, w_importance = w_load = 0.1) → LSTM 256 →
#    adaptive softmax; residual + dropout 0.1 around every layer, sigmoid on the MoE output
#    (App. C at a small width). $SMOE_DEMO_UPDATES updates (default 300) of 2048 tokens,
#    Adam, inverse_sqrt with 50 warmup updates: 614k tokens, about 30 % of one epoch.
# 4. fairseq-eval-lm on the full validation and test sets (217,646 and 245,569 tokens).
# 5. scripts/moe_utilisation.py: per-expert table (tokens, gate mass, characteristic words) on
#    the first 100k test tokens, and a bar chart.
# Everything goes to outputs/demo/ (git-ignored): train.log, eval-{valid,test}.log, checkpoints/,
# expert_utilisation.{png,json}, summary.txt.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
updates="${SMOE_DEMO_UPDATES:-300}"
out="outputs/demo"
data="outputs/data/wikitext-2/bin"
# One thread per process: the LSTM's per-step matrix products are small, and a second thread
# only pays off on an otherwise idle machine (set OMP_NUM_THREADS=2 to try).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${OMP_NUM_THREADS:-1}"
start=$(date +%s)
step() { echo; echo "==> [$(( $(date +%s) - start ))s] $*"; }

step "1/5 environment (scripts/bootstrap.sh)"
bash scripts/bootstrap.sh
py=.venv/bin/python

step "2/5 WikiText-2 → $data"
bash scripts/prepare-wikitext2.sh

step "3/5 training lstm_moe_lm_wikitext2_demo for $updates updates (log: $out/train.log)"
rm -rf "$out"
mkdir -p "$out"
.venv/bin/fairseq-train "$data" --user-dir fairseq_smoe --task language_modeling \
  --arch lstm_moe_lm_wikitext2_demo --criterion smoe_cross_entropy \
  --optimizer adam --adam-betas '(0.9,0.98)' --lr 0.004 --lr-scheduler inverse_sqrt \
  --warmup-updates 50 --warmup-init-lr 1e-7 --clip-norm 1.0 \
  --tokens-per-sample 64 --sample-break-mode none --max-tokens 2048 --max-update "$updates" \
  --cpu --num-workers 0 --seed 1 --log-format simple --log-interval 25 \
  --save-dir "$out/checkpoints" --no-epoch-checkpoints --disable-validation \
  > "$out/train.log" 2>&1 &
trainer=$!
# Progress: one line per 25 updates (training loss in bits, perplexity, balance metrics).
tail -n +1 -f "$out/train.log" --pid "$trainer" 2>/dev/null \
  | grep --line-buffered -E "train_inner|Error|error" \
  | sed -u -E 's/.* (loss=[^,]*).*(moe_cv_imp=[^,]*).*(moe_max_load=[^,]*).*(ppl=[^,]*).*(num_updates=[^,]*).*/  \5  \1  \4  \2  \3/' &
if ! wait "$trainer"; then
  echo "fairseq-train failed; the end of $out/train.log:" >&2
  tail -n 30 "$out/train.log" >&2
  exit 1
fi
sleep 1
checkpoint="$out/checkpoints/checkpoint_last.pt"

step "4/5 validation and test perplexity (fairseq-eval-lm on the full splits, in parallel)"
evals=()
for split in valid test; do
  .venv/bin/fairseq-eval-lm "$data" --user-dir fairseq_smoe --path "$checkpoint" --gen-subset "$split" \
    --tokens-per-sample 64 --max-tokens 8192 --cpu > "$out/eval-$split.log" 2>&1 &
  evals+=($!)
done
for pid in "${evals[@]}"; do
  wait "$pid" || { echo "fairseq-eval-lm failed:" >&2; tail -n 30 "$out"/eval-*.log >&2; exit 1; }
done
ppl() { grep -o "Perplexity: [0-9.]*" "$out/eval-$1.log" | grep -o "[0-9.]*$"; }
valid_ppl=$(ppl valid); test_ppl=$(ppl test)
[ -n "$valid_ppl" ] && [ -n "$test_ppl" ] || { tail -n 30 "$out"/eval-*.log >&2; exit 1; }
for split in valid test; do
  echo "  $split: $(grep -o "Evaluated [0-9,]* tokens" "$out/eval-$split.log"), perplexity $(ppl "$split")"
done

step "5/5 per-expert utilisation (scripts/moe_utilisation.py, first 100k test tokens)"
"$py" scripts/moe_utilisation.py --path "$checkpoint" --data "$data" \
  --subset test --max-tokens 100000 --plot "$out/expert_utilisation.png" \
  --json "$out/expert_utilisation.json" 2> >(grep -v -e tensorboardX -e "^$" >&2)

elapsed=$(( $(date +%s) - start ))
{
  echo
  echo "LSTM-MoE (lstm_moe_lm_wikitext2_demo, 16 experts, k=2) on WikiText-2, $updates updates x 2048 tokens"
  echo "  validation perplexity: $valid_ppl   (217,646 tokens)"
  echo "  test perplexity:       $test_ppl   (245,569 tokens)"
  echo "  for reference: unigram perplexity valid 965.1 / test 911.7; with the same budget (300 updates)"
  echo "  a dense 3xLSTM of equal compute reached 323.9 / 300.5 and fairseq's lstm_lm 1018.2 / 960.1"
  echo "  (examples/language_model/README.md); fully trained LSTMs reach 65-100."
  echo "  total time: ${elapsed}s; outputs in $out/"
} | tee "$out/summary.txt"
