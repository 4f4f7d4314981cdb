#!/usr/bin/env bash
# Multi30k (Task 1, lower-cased Moses-tokenized) → joint BPE → fairseq-preprocess binaries for
# --task translation.
#
#   bash scripts/prepare-multi30k.sh [--pair en-de|en-fr] [--src DIR] [--out DIR]
#                                    [--bpe-merges N] [--workers N]
#
# --pair: source-target languages (default en-de; en-fr too; the reverse directions work).
# --src:  a folder with {train,val,test_2016_flickr,test_2017_flickr,test_2017_mscoco}.lc.norm.tok.LANG
#         (plain or .xz/.gz); default: the copy shipped in data/multi30k/tok (see its README).
# --out:  default outputs/data/multi30k.PAIR → OUT/tok (text), OUT/bpe (BPE text + codes),
#         OUT/bin (the fairseq data dir, one joined dictionary for both languages).
# --bpe-merges: joint subword-nmt BPE merge operations learned on train (default 8000).
# Splits: train, valid = val, test = test_2016_flickr (the standard "test2016"),
#         test1 = test_2017_flickr, test2 = test_2017_mscoco.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { echo "[prepare-multi30k] $*" >&2; }
die() { echo "[prepare-multi30k] error: $*" >&2; exit 1; }

pair="en-de"; src="$root/data/multi30k/tok"; out=""; merges=8000; workers=2
while [ $# -gt 0 ]; do
  case "$1" in
    --pair) pair="$2"; shift 2 ;;
    --src) src="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --bpe-merges) merges="${2-}"; shift $(( $# > 1 ? 2 : 1 ))
                  [[ "$merges" =~ ^[1-9][0-9]*$ ]] \
                    || die "--bpe-merges ${merges:-(no value)}: give a positive integer, the number of BPE merge operations (e.g. --bpe-merges 8000)" ;;
    --workers) workers="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/{s/^# \{0,1\}//;p;}}' "$0"; exit 0 ;;  # the header, as usage
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
s="${pair%-*}"; t="${pair#*-}"
for l in "$s" "$t"; do
  case "$l" in en|de|fr) ;; *) die "--pair $pair: languages must be two of en, de, fr (e.g. en-de)" ;; esac
done
[ "$s" != "$t" ] || die "--pair $pair: source and target must differ"
[ -d "$src" ] || die "no such folder: $src (give --src DIR with the Multi30k tok/ files)"
out="${out:-$root/outputs/data/multi30k.$pair}"
bin="$root/.venv/bin"
for tool in subword-nmt fairseq-preprocess; do
  [ -x "$bin/$tool" ] || die "$bin/$tool not found: run bash scripts/bootstrap.sh first"
done
if [ -f "$out/bin/.done" ]; then
  say "already prepared: $out/bin (delete $out to redo)"
  exit 0
fi

# Decompress one split/language into OUT/tok/SPLIT.LANG, checking the line count.
extract() {  # upstream-split fairseq-split lang lines
  local stem="$src/$1.lc.norm.tok.$3" dest="$out/tok/$2.$3" n
  if [ -f "$stem" ]; then cp "$stem" "$dest"
  elif [ -f "$stem.xz" ]; then xz -dc "$stem.xz" > "$dest"
  elif [ -f "$stem.gz" ]; then gzip -dc "$stem.gz" > "$dest"
  else die "missing $stem(.xz|.gz)"; fi
  n=$(wc -l < "$dest")
  [ "$n" -eq "$4" ] || die "$dest has $n lines, expected $4: is $src the Multi30k tok/ folder?"
}
mkdir -p "$out/tok" "$out/bpe"
for spec in "train train 29000" "val valid 1014" "test_2016_flickr test 1000" \
            "test_2017_flickr test1 1000" "test_2017_mscoco test2 461"; do
  read -r upstream split lines <<< "$spec"
  for l in "$s" "$t"; do extract "$upstream" "$split" "$l" "$lines"; done
done
say "extracted tok/ text to $out/tok"

say "learning $merges joint BPE merges on train.$s + train.$t"
"$bin/subword-nmt" learn-joint-bpe-and-vocab --input "$out/tok/train.$s" "$out/tok/train.$t" \
  -s "$merges" -o "$out/bpe/codes" \
  --write-vocabulary "$out/bpe/vocab.$s" "$out/bpe/vocab.$t"
for split in train valid test test1 test2; do
  for l in "$s" "$t"; do
    "$bin/subword-nmt" apply-bpe -c "$out/bpe/codes" < "$out/tok/$split.$l" > "$out/bpe/$split.$l"
  done
done
say "applied BPE: $out/bpe"

# An interrupted run leaves a partial bin/ (no .done), whose dictionaries fairseq-preprocess
# refuses to overwrite (FileExistsError): start it afresh.
if [ -e "$out/bin" ]; then
  say "removing $out/bin, left unfinished by an earlier run"
  rm -rf "$out/bin"
fi
"$bin/fairseq-preprocess" --source-lang "$s" --target-lang "$t" \
  --trainpref "$out/bpe/train" --validpref "$out/bpe/valid" \
  --testpref "$out/bpe/test,$out/bpe/test1,$out/bpe/test2" \
  --destdir "$out/bin" --joined-dictionary --workers "$workers" 2>&1 \
  | grep -v "tensorboardX" >&2
touch "$out/bin/.done"
say "done: $out/bin (fairseq data dir; joined dictionary $(wc -l < "$out/bin/dict.$s.txt") types)"
