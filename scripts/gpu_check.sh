#!/usr/bin/env bash
# The GPU check: scripts/gpu_check.sh OUTDIR [tests|bench|all] [--op FAMILY ...] [--dry-run]
#
# On a GPU machine with no network (the lent H200's image: its own python3 with torch,
# triton, NumPy, CuPy, pytest, pytest-xdist): installs sparqle into that interpreter with no
# venv, no download and no dependency change (--no-deps), then runs `sparqle gpu-check`
# (bench/gpu_check.py): the tests on the CUDA backends with one autotune config (about 3
# minutes), then the headline benchmark points (about 4 minutes). OUTDIR gets bench.json,
# tests.log, junit.xml, summary.md and this script's own log, gpu_check.log.
#
# PYTHON picks the interpreter (default python3); SPARQLE_COMMIT stamps the results when the
# tree has no .git; SPARQLE_NO_INSTALL=1 skips the install (CI's dry run, a second run).
# docs/gpu.md tells how to run it and where its results go.
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,3p' "$0" | sed 's/^# //'; exit 2; }
out=$1
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
mkdir -p "$out"
log="$out/gpu_check.log"
{
  if [ "${SPARQLE_NO_INSTALL:-0}" != 1 ]; then
    "$py" -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v "^$" || true
    "$py" -c "import sparqle" || { echo "sparqle did not install into $py"; exit 3; }
  fi
  if [ -z "${SPARQLE_COMMIT:-}" ] && git rev-parse --short HEAD >/dev/null 2>&1; then
    SPARQLE_COMMIT=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!bench/results' 2>/dev/null || echo -dirty)
    export SPARQLE_COMMIT
  fi
  if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export TRITON_INTERPRET=1  # no GPU: a dry run, the kernels interpreted
  fi
  PYTHONUNBUFFERED=1 "$py" -m sparqle.cli gpu-check "${@:1}"
} 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
