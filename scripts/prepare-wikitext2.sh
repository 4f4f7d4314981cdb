#!/usr/bin/env bash
# WikiText-2 (v1, tokenized) → fairseq-preprocess binaries for --task language_modeling.
#
#   bash scripts/prepare-wikitext2.sh [--src DIR] [--out DIR] [--workers N]
#
# --src: a folder with wiki.{train,valid,test}.tokens (plain, .xz or .gz); default: the copy
#        shipped in data/wikitext-2/ (CC BY-SA 3.0, see its README).
# --out: default outputs/data/wikitext-2 → OUT/raw/*.tokens and OUT/bin/ (the fairseq data dir).
# Line counts and sha256s are checked against the published files. The vocabulary is the
# full training vocabulary (33,278 types with <eos>; fairseq adds its 4 special symbols).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lm-data-common.sh
source "$root/scripts/lm-data-common.sh"

src="$root/data/wikitext-2"; out="$root/outputs/data/wikitext-2"; workers=2
while [ $# -gt 0 ]; do
  case "$1" in
    --src) src="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/{s/^# \{0,1\}//;p;}}' "$0"; exit 0 ;;  # the header, as usage
    *) lm_die "unknown argument $1 (see --help)" ;;
  esac
done
[ -d "$src" ] || lm_die "no such folder: $src (give --src DIR with wiki.{train,valid,test}.tokens)"
preprocess="$(lm_find_preprocess "$root")"

if [ -f "$out/bin/.done" ]; then
  lm_say "already prepared: $out/bin (delete it to redo)"
  exit 0
fi
mkdir -p "$out/raw"
#          split  lines  sha256 of the decompressed text (public checksums)
for spec in "train 36718 9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f" \
            "valid 3760 f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8" \
            "test 4358 d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"; do
  read -r split lines sha <<< "$spec"
  file="$(lm_find_split "$src" "wiki.$split.tokens" "$split.txt")" \
    || lm_die "missing $src/wiki.$split.tokens(.xz): give --src a folder with the WikiText-2 v1 files"
  lm_extract_checked "$file" "$out/raw/$split.tokens" "$lines" "$sha"
done
lm_binarize "$preprocess" "$out/raw" "$out/bin" "$workers"
touch "$out/bin/.done"
