# Shared helpers of scripts/prepare-{wikitext2,ptb,lm1b}.sh (sourced, not run).
# They print progress to stderr and stop with a message naming the fix on any problem.

lm_say() { echo "[$(basename "$0" .sh)] $*" >&2; }
lm_die() { echo "[$(basename "$0" .sh)] error: $*" >&2; exit 1; }

# The fairseq-preprocess of the project's venv (bootstrapped if needed), else one on PATH.
lm_find_preprocess() {
  local root="$1"
  if [ -x "$root/.venv/bin/fairseq-preprocess" ]; then
    echo "$root/.venv/bin/fairseq-preprocess"
  elif command -v fairseq-preprocess >/dev/null 2>&1; then
    command -v fairseq-preprocess
  else
    lm_die "fairseq-preprocess not found: run 'bash scripts/bootstrap.sh' first"
  fi
}

# lm_find_split DIR NAME...: the first of DIR/NAME or DIR/NAME.xz or DIR/NAME.gz that exists.
lm_find_split() {
  local dir="$1"; shift
  local name
  for name in "$@"; do
    for f in "$dir/$name" "$dir/$name.xz" "$dir/$name.gz"; do
      if [ -f "$f" ]; then echo "$f"; return 0; fi
    done
  done
  return 1
}

# lm_cat FILE: the text of FILE, decompressed if it ends in .xz or .gz; fails on corrupt input.
lm_cat() {
  case "$1" in
    *.xz) xz -dc -- "$1" ;;
    *.gz) gzip -dc -- "$1" ;;
    *) cat -- "$1" ;;
  esac
}

# lm_readable SRC: SRC decompresses (or reads) whole, writing nothing: tells a damaged input from
# a failed write after an extraction failed.
lm_readable() {
  case "$1" in
    *.xz) xz -t -- "$1" 2>/dev/null ;;
    *.gz) gzip -t -- "$1" 2>/dev/null ;;
    *) cat -- "$1" > /dev/null 2>&1 ;;
  esac
}

# lm_write_failed FILE ERROR: stop with one line naming FILE's folder and its free space (df).
lm_write_failed() {
  local dir free
  dir="$(dirname -- "$1")"
  free="$(df -Ph -- "$dir" 2>/dev/null | awk 'NR == 2 {print $4}')"
  lm_die "cannot write $1 (${2:-write error}): $dir has ${free:-?} free (df -h $dir); free some space or give --out a folder on a disk with room, then run again"
}

# lm_extract_checked SRC DEST LINES SHA256: decompress SRC to DEST and check it ("-" skips a check).
lm_extract_checked() {
  local src="$1" dest="$2" want_lines="$3" want_sha="$4" err
  lm_say "reading $src"
  if ! err="$(lm_cat "$src" 2>&1 > "$dest.tmp")"; then
    rm -f "$dest.tmp"
    if lm_readable "$src"; then  # the input is whole: the write failed (a full disk, ...)
      lm_write_failed "$dest.tmp" "$(printf '%s' "$err" | tail -n 1)"
    fi
    [ -z "$err" ] || printf '%s\n' "$err" >&2
    lm_die "$src is corrupt or truncated (decompression failed); fetch it again"
  fi
  local lines sha
  lines=$(wc -l < "$dest.tmp")
  if [ "$want_lines" != "-" ] && [ "$lines" != "$want_lines" ]; then
    rm -f "$dest.tmp"
    lm_die "$src has $lines lines, expected $want_lines: wrong or damaged file"
  fi
  if [ "$want_sha" != "-" ]; then
    sha=$(sha256sum < "$dest.tmp" | cut -d' ' -f1)
    if [ "$sha" != "$want_sha" ]; then
      rm -f "$dest.tmp"
      lm_die "$src: sha256 $sha differs from the published $want_sha: wrong or damaged file"
    fi
  fi
  mv "$dest.tmp" "$dest"
  lm_say "  $(basename "$dest"): $lines lines$([ "$want_sha" != "-" ] && echo ", sha256 ok")"
}

# lm_binarize PREPROCESS RAWDIR BINDIR WORKERS [extra fairseq-preprocess args...]
# RAWDIR holds train.tokens, valid.tokens, test.tokens.
lm_binarize() {
  local preprocess="$1" raw="$2" bin="$3" workers="$4"; shift 4
  lm_say "binarizing with fairseq-preprocess into $bin ($workers workers)"
  rm -rf "$bin"
  "$preprocess" --only-source --task language_modeling \
    --trainpref "$raw/train.tokens" --validpref "$raw/valid.tokens" --testpref "$raw/test.tokens" \
    --destdir "$bin" --workers "$workers" "$@" 2>&1 \
    | grep -v -e "tensorboardX" -e "Namespace(" -e "^$" | sed 's/^/    /' >&2
  [ -f "$bin/train.bin" ] && [ -f "$bin/dict.txt" ] \
    || lm_die "fairseq-preprocess did not produce $bin/train.bin (see its output above)"
  lm_say "done: $bin (dict.txt: $(wc -l < "$bin/dict.txt") entries; fairseq adds <s> <pad> </s> <unk>)"
}
