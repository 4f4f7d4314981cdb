#!/usr/bin/env bash
# Rehearse the GPU check on this CPU machine before a GPU is lent.
#
#   bash scripts/rehearse_device.sh               # build the replica if needed, then rehearse
#   bash scripts/rehearse_device.sh --build-only  # only build (or check) the replica venv
#
# The lent GPU machine has no network and a Python 3.12 with torch 2.11.0, triton 3.6.0,
# numpy 2.5.2, pytest, sacrebleu and tensorboard, but no fairseq and none of fairseq's
# configuration stack. A mistake in scripts/gpu_check.sh or in the wheel bundle found there
# costs minutes of a 15-minute lease, so this script builds a venv that has those packages and
# nothing else (outputs/device-replica/venv, ignored; built once, reused after), makes sure the
# bundle in .whl/ exists (scripts/build_device_bundle.sh), runs
# `bash scripts/gpu_check.sh --rehearsal` with that venv's Python and OUT set, as the device tool
# would, and checks that exactly the tarball and the summary came back and that every step
# passed.
#
# PyPI's torch 2.11.0 for Linux is a CUDA build: it imports only with its nvidia-* libraries,
# several GB, downloaded once into the replica (the first build took the time printed at its
# end and recorded in the replica's stamp file; docs/gpu.md has the figure measured here).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
replica="${SMOE_REPLICA:-$root/outputs/device-replica}"
venv="$replica/venv"
stamp="$venv/.replica-stamp"
# What the device holds of what matters to us, and nothing else: torch, triton and numpy at the
# device's versions, pytest, sacrebleu, tensorboard, and the packages of the device's image
# (device tool's KINDS.md) that fairseq imports when it starts or gpu_check.sh uses: PyYAML
# (omegaconf), tqdm, scipy and scikit-learn (fairseq.tasks and fairseq.criterions import them),
# Cython, torchaudio (imported lazily; there because the device has it), pytest-xdist. scipy and
# scikit-learn alone are about 50 MB of wheels: they could not travel in the bundle, so the
# rehearsal must not hide them by lacking them.
pins=(torch==2.11.0 triton==3.6.0 numpy==2.5.2 pytest sacrebleu tensorboard
      pytest-xdist pyyaml tqdm scipy scikit-learn cython torchaudio==2.11.0)
want="$(printf '%s\n' "${pins[@]}" | sha256sum | cut -d' ' -f1)"
say() { echo "[rehearse] $*" >&2; }
die() { say "error: $*"; exit 1; }

build_only=0
case "${1:-}" in
  --build-only) build_only=1 ;;
  "") ;;
  *) die "unknown argument '$1' (use --build-only or nothing)" ;;
esac

find_python312() {
  if [ -n "${PYTHON312:-}" ]; then echo "$PYTHON312"; return; fi
  local candidate
  # The newest 3.12 that pyenv has, else one on PATH.
  for candidate in $(ls -d "$HOME"/.pyenv/versions/3.12.*/bin/python3 2>/dev/null | sort -V -r) \
                   "$(command -v python3.12 || true)"; do
    [ -x "$candidate" ] && { echo "$candidate"; return; }
  done
  return 1
}

if [ -f "$stamp" ] && [ "$(head -1 "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  say "replica venv ready: $venv ($(sed -n 2p "$stamp"))"
else
  py312="$(find_python312)" || die "no Python 3.12 found: install one with pyenv (pyenv install 3.12) or set PYTHON312=/path/to/python3.12"
  say "building the device replica in $venv with $py312 ($("$py312" --version 2>&1))"
  say "pip installs ${pins[*]}: PyPI's CUDA torch with its nvidia-* libraries, several GB the first time"
  mkdir -p "$replica"
  start=$(date +%s)
  [ -x "$venv/bin/python" ] || "$py312" -m venv "$venv"
  # --no-cache-dir: the venv itself is the cache; a second copy in ~/.cache would double the GBs.
  "$venv/bin/python" -m pip install --disable-pip-version-check --no-cache-dir -q "${pins[@]}" \
    || die "pip could not install the replica's packages (network? see the lines above); rerun to resume"
  seconds=$(( $(date +%s) - start ))
  size="$(du -sh "$venv" | cut -f1)"
  printf '%s\nbuilt in %ss, %s, %s\n' "$want" "$seconds" "$size" "$(date -u +%FT%TZ)" > "$stamp"
  say "replica built in ${seconds}s ($size)"
fi

"$venv/bin/python" - <<'PY' || die "the replica venv is not what the device has: rm -r outputs/device-replica/venv and rerun"
import importlib.util, sys
import torch
assert sys.version_info[:2] == (3, 12), sys.version
assert torch.__version__.startswith("2.11.0"), torch.__version__
# The point of the replica: none of these may be there, as on the device.
present = [m for m in ("fairseq", "hydra", "omegaconf", "antlr4", "bitarray")
           if importlib.util.find_spec(m) is not None]
assert not present, f"the replica has {present}, which the device lacks"
PY
[ "$build_only" = 1 ] && exit 0

bash scripts/build_device_bundle.sh

out="$(mktemp -d "${TMPDIR:-/tmp}/smoe-rehearsal.XXXXXX")"
say "rehearsal: OUT=$out PYTHON=$venv/bin/python bash scripts/gpu_check.sh --rehearsal"
start=$(date +%s)
status=0
# A clean environment as on the device: no PYTHONPATH of ours, no venv activated.
env -u PYTHONPATH -u VIRTUAL_ENV OUT="$out" PYTHON="$venv/bin/python" \
  bash scripts/gpu_check.sh --rehearsal || status=$?
seconds=$(( $(date +%s) - start ))
say "gpu_check.sh --rehearsal exited $status after ${seconds}s"
came_back="$(ls -A "$out")"
say "in OUT: $(echo "$came_back" | tr '\n' ' ')"
[ "$(echo "$came_back" | wc -l)" -le 8 ] || die "more than 8 files in OUT: the device tool would drop some"
[ -f "$out/gpu_check.tar.gz" ] || die "no gpu_check.tar.gz in $out"
[ -f "$out/gpu_check_summary.json" ] || die "no gpu_check_summary.json in $out"
tar -tzf "$out/gpu_check.tar.gz" > /dev/null || die "gpu_check.tar.gz in $out does not unpack"
"$venv/bin/python" - "$out/gpu_check_summary.json" <<'PY' || die "a rehearsal step failed: see $out"
import json, sys
summary = json.load(open(sys.argv[1]))
for s in summary["steps"]:
    print(f"[rehearse]   {s['step']:<24} {s['status']:<8} {s['seconds']:>6.1f}s  {s.get('note', '')}",
          file=sys.stderr)
failed = [s["step"] for s in summary["steps"] if s["status"] not in ("ok", "skipped")]
# Every step that needs no CUDA must have run and passed.
must_pass = {"bundle", "import_check", "pytest_gpu", "sync_debug", "benchmark", "train_fp32"}
failed += sorted(must_pass - {s["step"] for s in summary["steps"] if s["status"] == "ok"} - set(failed))
sys.exit(f"[rehearse] failed steps: {', '.join(failed)}" if failed else 0)
PY
[ "$status" = 0 ] || die "gpu_check.sh --rehearsal exited $status: see $out"
say "rehearsal passed in ${seconds}s; the tarball and summary are in $out"
