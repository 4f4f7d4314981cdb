#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv.
#
# Idempotent: a stamp file records a hash of requirements.txt, setup.py and this script;
# when nothing changed the script returns at once. Used by scripts/run_tests.sh and
# scripts/demo.sh, so a fresh machine needs no manual install step.
#
# fairseq: PyPI's fairseq 0.12.2 does not install on Python 3.11, so we build the
# `fairseq-fixed` distribution (same `fairseq` module and CLIs). It must be built without
# build isolation, against the pinned CPU torch already in the venv; otherwise pip would
# build it against a freshly downloaded CUDA torch.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SMOE_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.smoe-bootstrap-stamp"
want="$(cat "$root/requirements.txt" "$root/setup.py" "$root/scripts/bootstrap.sh" | sha256sum | cut -d' ' -f1)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi

say() { echo "[bootstrap] $*" >&2; }
if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 9) else 1)'; then
  say "Python >= 3.9 is required (found $("$python" --version 2>&1)); set PYTHON=/path/to/python3.11"
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  say "creating virtual environment in $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
say "installing build tools"
"${pip[@]}" install --upgrade pip setuptools wheel numpy cython
say "installing torch==2.13.0 and the runtime dependencies"
"${pip[@]}" install -r "$root/requirements.txt"
if ! "$venv/bin/python" -c 'import fairseq' >/dev/null 2>&1; then
  say "building fairseq (fairseq-fixed 0.12.3.1) without build isolation; this takes about 2 minutes"
  "${pip[@]}" install --no-build-isolation --no-deps fairseq-fixed==0.12.3.1
fi
say "installing fairseq-smoe in editable mode"
"${pip[@]}" install --no-build-isolation --no-deps -e "$root"
"$venv/bin/python" - <<'PY'
import torch, fairseq  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
PY
echo "$want" > "$stamp"
say "environment ready: $venv"
