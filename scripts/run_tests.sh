#!/usr/bin/env bash
# The test suite: creates/refreshes .venv, lints with ruff, runs pytest.
# Extra arguments go to pytest (e.g. `bash scripts/run_tests.sh -k gating -x`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
echo "[tests] ruff check" >&2
.venv/bin/ruff check .
echo "[tests] pytest" >&2
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
