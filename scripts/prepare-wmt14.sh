#!/usr/bin/env bash
# WMT'14 English→German or English→French (the paper's §5.3 benchmarks) → fairseq binaries.
#
#   bash scripts/prepare-wmt14.sh --pair en-de|en-fr [--archives DIR] [--out DIR]
#                                 [--bpe-merges N] [--bpe-sample N] [--workers N] [--no-download]
#
# --archives: folder holding the official statmt.org archives (names below). Missing ones are
#             downloaded into it unless --no-download (default: outputs/data/wmt14-archives).
#             Without network, copy the archives there first.
# --out:      default outputs/data/wmt14.PAIR → OUT/tok (Moses-tokenized text), OUT/bpe (BPE text,
#             codes), OUT/bin (fairseq data dir), OUT/test.raw.LANG (untokenized newstest2014).
# --bpe-merges: joint subword-nmt merges (default 32000: the paper's shared ~32k vocabulary).
# --bpe-sample: learn BPE on a random sample of N training pairs (default 0: all; En-Fr has
#               ~36M pairs, where a sample of a few million is plenty and much faster).
# Pipeline: extract → sacremoses normalize + tokenize -a (cased) → drop empty pairs, pairs over
# 250 tokens or with length ratio > 1.5 (train only) → joint BPE → fairseq-preprocess
# --joined-dictionary. Splits: train; valid = newstest2013; test = newstest2014 (full, 3,003).
#
# Archives (statmt.org):
#   both:  training-parallel-europarl-v7.tgz, training-parallel-commoncrawl.tgz (wmt13),
#          training-parallel-nc-v9.tgz, dev.tgz, test-full.tgz (wmt14)
#   en-fr: also training-parallel-un.tgz (wmt13), training-giga-fren.tar (wmt10)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { echo "[prepare-wmt14] $(date -u +%H:%M:%S) $*" >&2; }
die() { echo "[prepare-wmt14] error: $*" >&2; exit 1; }

pair=""; archives="$root/outputs/data/wmt14-archives"; out=""; merges=32000; sample=0; workers=4
download=1
while [ $# -gt 0 ]; do
  case "$1" in
    --pair) pair="$2"; shift 2 ;;
    --archives) archives="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --bpe-merges) merges="${2-}"; shift $(( $# > 1 ? 2 : 1 ))
                  [[ "$merges" =~ ^[1-9][0-9]*$ ]] \
                    || die "--bpe-merges ${merges:-(no value)}: give a positive integer, the number of BPE merge operations (e.g. --bpe-merges 32000)" ;;
    --bpe-sample) sample="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --no-download) download=0; shift ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/{s/^# \{0,1\}//;p;}}' "$0"; exit 0 ;;  # the header, as usage
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
case "$pair" in
  en-de) f=de ;;
  en-fr) f=fr ;;
  *) die "give --pair en-de or --pair en-fr" ;;
esac
out="${out:-$root/outputs/data/wmt14.$pair}"
bin="$root/.venv/bin"
for tool in sacremoses subword-nmt fairseq-preprocess python; do
  [ -x "$bin/$tool" ] || die "$bin/$tool not found: run bash scripts/bootstrap.sh first"
done
if [ -f "$out/bin/.done" ]; then
  say "already prepared: $out/bin (delete $out to redo)"
  exit 0
fi

# archive name → URL
declare -A url=(
  [training-parallel-europarl-v7.tgz]=http://statmt.org/wmt13/training-parallel-europarl-v7.tgz
  [training-parallel-commoncrawl.tgz]=http://statmt.org/wmt13/training-parallel-commoncrawl.tgz
  [training-parallel-nc-v9.tgz]=http://statmt.org/wmt14/training-parallel-nc-v9.tgz
  [dev.tgz]=http://statmt.org/wmt14/dev.tgz
  [test-full.tgz]=http://statmt.org/wmt14/test-full.tgz
  [training-parallel-un.tgz]=http://statmt.org/wmt13/training-parallel-un.tgz
  [training-giga-fren.tar]=http://statmt.org/wmt10/training-giga-fren.tar
)
needed=(training-parallel-europarl-v7.tgz training-parallel-commoncrawl.tgz training-parallel-nc-v9.tgz
        dev.tgz test-full.tgz)
# training corpora: path inside the extracted archives, without the .LANG suffix
corpora=(training/europarl-v7.$f-en commoncrawl.$f-en training/news-commentary-v9.$f-en)
if [ "$f" = fr ]; then
  needed+=(training-parallel-un.tgz training-giga-fren.tar)
  corpora+=(un/undoc.2000.fr-en giga-fren.release2.fixed)
fi

mkdir -p "$archives" "$out/orig" "$out/tok" "$out/bpe"
for name in "${needed[@]}"; do
  if [ ! -s "$archives/$name" ]; then
    [ "$download" = 1 ] || die "missing $archives/$name (download ${url[$name]} or drop --no-download)"
    say "downloading ${url[$name]}"
    curl -fL --retry 3 -o "$archives/$name.part" "${url[$name]}" \
      || die "download of ${url[$name]} failed: fetch it elsewhere and put it in $archives"
    mv "$archives/$name.part" "$archives/$name"
  fi
  if [ ! -f "$out/orig/.$name.done" ]; then
    say "extracting $name"
    tar -xf "$archives/$name" -C "$out/orig" \
      || die "$archives/$name is corrupt or truncated (tar failed): delete it and run again to download it anew (or copy a good copy of ${url[$name]} there)"
    touch "$out/orig/.$name.done"
  fi
done
if [ "$f" = fr ]; then  # giga-fren ships its two sides gzipped inside the tar
  for l in en fr; do
    gz="$out/orig/giga-fren.release2.fixed.$l.gz"
    if [ -f "$gz" ]; then
      gzip -d "$gz" || die "$gz is corrupt or truncated (gzip failed): delete $archives/training-giga-fren.tar and $out/orig/.training-giga-fren.tar.done, then run again"
    fi
  done
fi

# Plain text of newstest SGML: the <seg> contents in order.
sgm_to_text() {
  "$bin/python" -c '
import re, sys
for line in open(sys.argv[1], encoding="utf-8"):
    m = re.search(r"<seg[^>]*>(.*)</seg>", line)
    if m:
        print(" ".join(m.group(1).split()))' "$1"
}

tokenize() {  # lang < text > tokens
  "$bin/sacremoses" -q -l "$1" -j "$workers" normalize tokenize -a
}

say "concatenating training corpora: ${corpora[*]}"
for l in en "$f"; do
  : > "$out/orig/train.$l"
  for corpus in "${corpora[@]}"; do
    [ -f "$out/orig/$corpus.$l" ] || die "missing $out/orig/$corpus.$l: is an archive incomplete?"
    cat "$out/orig/$corpus.$l" >> "$out/orig/train.$l"
  done
done
[ "$(wc -l < "$out/orig/train.en")" -eq "$(wc -l < "$out/orig/train.$f")" ] \
  || die "the training sides have different line counts"
for l in en "$f"; do
  cp "$out/orig/dev/newstest2013.$l" "$out/orig/valid.$l" 2>/dev/null \
    || die "missing dev/newstest2013.$l in dev.tgz"
done
src_sgm="$out/orig/test-full/newstest2014-${f}en-src.en.sgm"
ref_sgm="$out/orig/test-full/newstest2014-${f}en-ref.$f.sgm"
[ -f "$src_sgm" ] && [ -f "$ref_sgm" ] || die "missing newstest2014 SGML in test-full.tgz"
sgm_to_text "$src_sgm" > "$out/test.raw.en"
sgm_to_text "$ref_sgm" > "$out/test.raw.$f"
[ "$(wc -l < "$out/test.raw.en")" -eq 3003 ] || die "newstest2014 should have 3003 segments"

for split in train valid; do
  for l in en "$f"; do
    say "tokenizing $split.$l"
    tokenize "$l" < "$out/orig/$split.$l" > "$out/tok/$split.$l"
  done
done
for l in en "$f"; do
  tokenize "$l" < "$out/test.raw.$l" > "$out/tok/test.$l"
done

say "cleaning train: non-empty, <= 250 tokens, length ratio <= 1.5"
"$bin/python" - "$out/tok/train.en" "$out/tok/train.$f" <<'PY'
import os, sys
a_path, b_path = sys.argv[1:3]
kept = total = 0
with open(a_path, encoding="utf-8") as a, open(b_path, encoding="utf-8") as b, \
        open(a_path + ".clean", "w", encoding="utf-8") as a_out, \
        open(b_path + ".clean", "w", encoding="utf-8") as b_out:
    for line_a, line_b in zip(a, b):
        total += 1
        na, nb = len(line_a.split()), len(line_b.split())
        if 1 <= na <= 250 and 1 <= nb <= 250 and max(na, nb) <= 1.5 * min(na, nb):
            a_out.write(line_a)
            b_out.write(line_b)
            kept += 1
os.replace(a_path + ".clean", a_path)
os.replace(b_path + ".clean", b_path)
print(f"[prepare-wmt14] kept {kept} of {total} training pairs", file=sys.stderr)
PY

bpe_in=("$out/tok/train.en" "$out/tok/train.$f")
if [ "$sample" -gt 0 ]; then
  say "sampling $sample training pairs for BPE learning"
  paste "$out/tok/train.en" "$out/tok/train.$f" | shuf -n "$sample" --random-source=<(yes) \
    > "$out/bpe/sample.tsv"
  cut -f1 "$out/bpe/sample.tsv" > "$out/bpe/sample.en"
  cut -f2 "$out/bpe/sample.tsv" > "$out/bpe/sample.$f"
  bpe_in=("$out/bpe/sample.en" "$out/bpe/sample.$f")
fi
say "learning $merges joint BPE merges (slow on the full corpus: an hour or more)"
"$bin/subword-nmt" learn-joint-bpe-and-vocab --input "${bpe_in[@]}" -s "$merges" \
  -o "$out/bpe/codes" --write-vocabulary "$out/bpe/vocab.en" "$out/bpe/vocab.$f"
for split in train valid test; do
  for l in en "$f"; do
    say "applying BPE to $split.$l"
    "$bin/subword-nmt" apply-bpe -c "$out/bpe/codes" --num-workers "$workers" \
      < "$out/tok/$split.$l" > "$out/bpe/$split.$l"
  done
done

# An interrupted run leaves a partial bin/ (no .done), whose dictionaries fairseq-preprocess
# refuses to overwrite (FileExistsError): start it afresh.
if [ -e "$out/bin" ]; then
  say "removing $out/bin, left unfinished by an earlier run"
  rm -rf "$out/bin"
fi
"$bin/fairseq-preprocess" --source-lang en --target-lang "$f" \
  --trainpref "$out/bpe/train" --validpref "$out/bpe/valid" --testpref "$out/bpe/test" \
  --destdir "$out/bin" --joined-dictionary --workers "$workers" 2>&1 | grep -v tensorboardX >&2
touch "$out/bin/.done"
say "done: $out/bin ($(wc -l < "$out/bin/dict.en.txt") joined types); raw test references: $out/test.raw.$f"
