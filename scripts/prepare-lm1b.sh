#!/usr/bin/env bash
# One Billion Word benchmark (Chelba et al. 2013) → fairseq-preprocess binaries, as the paper
# used it (§5.1): 99 training shards (~0.8B words), the vocabulary of words seen at least 3
# times in training (793,471 entries in the official list, with <S>, </S>, <UNK>), test =
# heldout shard 00000. Validation = heldout shard 00001 (our choice; the paper does not say).
#
#   bash scripts/prepare-lm1b.sh [--archive FILE | --src DIR] [--out DIR] [--workers N]
#                                [--max-train-shards N]
#
# --archive: the official 1-billion-word-language-modeling-benchmark-r13output.tar.gz (1.7 GB).
# --src:     the folder it extracts to (with training-monolingual.tokenized.shuffled/ and
#            heldout-monolingual.tokenized.shuffled/).
# Neither:   the archive is downloaded from statmt.org into OUT/ (needs network access).
# --max-train-shards N: use only the first N training shards (a quick, smaller run; the
#            vocabulary then differs from the benchmark's).
# --out:     default outputs/data/lm1b → OUT/raw/*.tokens and OUT/bin/.
# Binarizing the full corpus takes about an hour with 8 workers and ~4 GB of disk.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lm-data-common.sh
source "$root/scripts/lm-data-common.sh"

archive=""; src=""; out="$root/outputs/data/lm1b"; workers=8; max_shards=99
name="1-billion-word-language-modeling-benchmark-r13output"
url="http://www.statmt.org/lm-benchmark/$name.tar.gz"
while [ $# -gt 0 ]; do
  case "$1" in
    --archive) archive="$2"; shift 2 ;;
    --src) src="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --max-train-shards) max_shards="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/{s/^# \{0,1\}//;p;}}' "$0"; exit 0 ;;  # the header, as usage
    *) lm_die "unknown argument $1 (see --help)" ;;
  esac
done
[[ "$max_shards" =~ ^[0-9]+$ ]] && [ "$max_shards" -ge 1 ] && [ "$max_shards" -le 99 ] \
  || lm_die "--max-train-shards must be between 1 and 99; got $max_shards"
preprocess="$(lm_find_preprocess "$root")"
config="train shards: $max_shards"
if [ -f "$out/bin/.done" ] && [ "$(cat "$out/bin/.done")" = "$config" ]; then
  lm_say "already prepared: $out/bin ($config; delete it to redo)"
  exit 0
fi
mkdir -p "$out"

if [ -z "$src" ]; then
  if [ -z "$archive" ]; then
    archive="$out/$name.tar.gz"
    if [ ! -f "$archive" ]; then
      lm_say "downloading $url (1.7 GB)"
      curl -fL --retry 2 -o "$archive.part" "$url" \
        || lm_die "download failed (no network?): fetch $url elsewhere and pass --archive FILE"
      mv "$archive.part" "$archive"
    fi
  fi
  [ -f "$archive" ] || lm_die "no such archive: $archive"
  lm_say "extracting $archive into $out/ (a few minutes)"
  tar -xzf "$archive" -C "$out" \
    || lm_die "$archive is corrupt or truncated (tar failed): download it again"
  src="$out/$name"
fi
train_dir="$src/training-monolingual.tokenized.shuffled"
heldout_dir="$src/heldout-monolingual.tokenized.shuffled"
[ -d "$train_dir" ] && [ -d "$heldout_dir" ] \
  || lm_die "$src lacks training-monolingual.tokenized.shuffled/ or heldout-monolingual.tokenized.shuffled/: pass the folder the official archive extracts to"

mkdir -p "$out/raw"
lm_say "collecting $max_shards training shards"
: > "$out/raw/train.tokens.tmp"
for i in $(seq 1 "$max_shards"); do
  shard="$train_dir/news.en-$(printf %05d "$i")-of-00100"
  [ -s "$shard" ] || lm_die "missing or empty training shard $shard: incomplete extraction?"
  cat "$shard" >> "$out/raw/train.tokens.tmp"
  [ $((i % 10)) -eq 0 ] && lm_say "  $i / $max_shards shards"
done
mv "$out/raw/train.tokens.tmp" "$out/raw/train.tokens"
for spec in "test 00000" "valid 00001"; do
  read -r split shard_id <<< "$spec"
  shard="$heldout_dir/news.en.heldout-$shard_id-of-00050"
  [ -s "$shard" ] || lm_die "missing or empty heldout shard $shard"
  cp "$shard" "$out/raw/$split.tokens"
done
lines=$(wc -l < "$out/raw/train.tokens")
lm_say "train: $lines sentences$([ "$max_shards" -eq 99 ] && echo " (the benchmark has 30,301,028)")"
[ "$max_shards" -eq 99 ] && [ "$lines" -ne 30301028 ] \
  && lm_say "warning: expected 30,301,028 training sentences; is the extraction complete?"
lm_binarize "$preprocess" "$out/raw" "$out/bin" "$workers" --thresholdsrc 3
words=$(grep -vc "^madeupword" "$out/bin/dict.txt" || true)
lm_say "vocabulary: $words words seen >= 3 times (+ fairseq's <s> <pad> </s> <unk>)$([ "$max_shards" -eq 99 ] && echo "; the official list has 793,471 entries including <S> </S> <UNK>")"
echo "$config" > "$out/bin/.done"
