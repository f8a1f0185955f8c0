#!/usr/bin/env bash
# Sets up .venv with sparqle and everything its tests and benchmarks need, downloading
# nothing that is already there.
# - An interpreter that already has torch is reused: a virtual environment (a GPU image's
#   python3, say) becomes .venv itself (a link to it); a system interpreter gets a venv that
#   sees its packages. Otherwise a new venv gets torch==2.13.0, which on this project's
#   CPU-only machines is the CPU wheel on disk (elsewhere, install a CPU build of torch
#   first, from PyTorch's CPU index, so that pip does not fetch a multi-GB CUDA build).
#   PYTHON picks the interpreter (default python3).
# - sparqle is installed editable without touching installed packages; then only the
#   requirements (with the test and bench extras) that are missing are installed, pinned by
#   constraints.txt, and NumPy < 2.4 only where Triton's interpreter runs (no CUDA device).
#   Offline, what cannot be installed is listed and the tests that need it skip;
#   SPARQLE_REQUIRE_EXTRAS=1 (CI) makes that an error.
set -euo pipefail
cd "$(dirname "$0")/.."
base=${PYTHON:-python3}
if [ ! -e .venv ]; then
  if "$base" -c "import sys, torch; sys.exit(sys.prefix == sys.base_prefix)" 2>/dev/null; then
    ln -s "$("$base" -c 'import sys; print(sys.prefix)')" .venv
  else
    "$base" -m venv --system-site-packages .venv
  fi
fi
py=.venv/bin/python
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q "torch==2.13.0"
constraints=(constraints.txt)
"$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" || constraints+=(constraints-interpreter.txt)
isolation=()
"$py" -c "import setuptools, wheel" 2>/dev/null && isolation=(--no-build-isolation)
"$py" -m pip install -q --no-deps "${isolation[@]}" -e .
missing=$("$py" - "${constraints[@]}" <<'PY'
import importlib.metadata as metadata
import sys
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
pins = {}
for path in sys.argv[1:]:  # a constraint narrows the requirement of the same name
    for line in open(path):
        if line.split("#")[0].strip():
            pin = Requirement(line.split("#")[0].strip())
            pins[pin.name] = pin
for line in metadata.requires("sparqle") or []:
    req = Requirement(line)
    if req.name in pins:
        req.specifier &= pins[req.name].specifier
    if req.marker and not any(req.marker.evaluate({"extra": e}) for e in ("", "test", "bench")):
        continue
    try:
        if req.specifier.contains(metadata.version(req.name), prereleases=True):
            continue
    except metadata.PackageNotFoundError:
        pass
    print(str(req).split(";")[0])
PY
)
if [ -n "$missing" ]; then
  mapfile -t wanted <<<"$missing"
  if ! "$py" -m pip install -q --retries 1 --timeout 15 "${constraints[@]/#/--constraint=}" "${wanted[@]}"; then
    echo "scripts/install.sh: could not install: ${wanted[*]}; the tests that need them skip." >&2
    [ "${SPARQLE_REQUIRE_EXTRAS:-0}" != 1 ] || exit 1
  fi
fi
