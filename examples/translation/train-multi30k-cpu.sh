#!/usr/bin/env bash
# CPU-sized LSTM-MoE translation on Multi30k (En→De by default): prepare the data, train for a
# bounded wall time, then decode test2016 with beam search and score it.
#
#   bash examples/translation/train-multi30k-cpu.sh [--pair en-de] [--hours 0.45] [--out DIR]
#
# Model: the lstm_moe_nmt layout (bidirectional first encoder layer, 3+2 residual LSTMs,
# separable attention, MoE between encoder layers 2-3 and decoder layers 1-2, strictly balanced
# gating) shrunk to 256-dim layers and 256-unit LSTMs (no projection: torch's fast CPU LSTM path
# has none), 8 experts of hidden 512, embeddings shared across the joined dictionary.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
pair="en-de"; hours="0.45"; out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --pair) pair="$2"; shift 2 ;;
    --hours) hours="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 1 ;;
  esac
done
out="${out:-$root/outputs/multi30k.$pair}"
data="$root/outputs/data/multi30k.$pair/bin"
bin="$root/.venv/bin"
cd "$root"
bash scripts/prepare-multi30k.sh --pair "$pair"
mkdir -p "$out"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

"$bin/fairseq-train" "$data" --user-dir fairseq_smoe --task translation --cpu \
  --arch lstm_moe_nmt --encoder-embed-dim 256 --encoder-hidden-size 256 --attention-dim 256 \
  --moe-num-experts 8 --moe-k 2 --moe-hidden-dim 512 --share-all-embeddings --dropout 0.3 \
  --criterion smoe_label_smoothed_cross_entropy --label-smoothing 0.1 \
  --optimizer adam --adam-betas '(0.9, 0.98)' --clip-norm 1.0 --lr 0.003 \
  --lr-scheduler warmup_hold_inverse_sqrt --warmup-updates 100 --hold-updates 600 \
  --max-tokens 2500 --stop-time-hours "$hours" --max-epoch 50 \
  --save-dir "$out/checkpoints" --no-epoch-checkpoints --save-interval-updates 100 \
  --keep-interval-updates 1 --num-workers 0 --log-format simple --log-interval 20 --seed 1 \
  2>&1 | grep --line-buffered -v tensorboardX | tee "$out/train.log"

# Beam search on test2016 (the plugin keeps the last partial batch that fairseq alone would
# drop; --required-batch-size-multiple 1 is belt and braces). Tokenized BLEU on the lower-cased tok/ references (the usual Multi30k
# figure), then sacreBLEU on the same de-BPE'd text.
"$bin/fairseq-generate" "$data" --user-dir fairseq_smoe --cpu --path "$out/checkpoints/checkpoint_best.pt" \
  --gen-subset test --beam 5 --batch-size 64 --required-batch-size-multiple 1 --remove-bpe \
  2>&1 | grep -v tensorboardX > "$out/generate-test.txt"
grep '^H-' "$out/generate-test.txt" | sort -t- -k2,2n | cut -f3 > "$out/test.hyp"
grep '^T-' "$out/generate-test.txt" | sort -t- -k2,2n | cut -f2 > "$out/test.ref"
tail -1 "$out/generate-test.txt"
"$bin/sacrebleu" "$out/test.ref" -i "$out/test.hyp" -m bleu -b -w 2 | sed 's/^/sacreBLEU (13a on tokenized text): /'
