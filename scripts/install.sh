#!/usr/bin/env bash
# Sets up .venv with sparqle and everything its tests and benchmarks need.
# - Reuses a torch that is already installed (a GPU machine's CUDA build): the venv sees
#   the system's packages.
# - Otherwise installs torch==2.13.0, which on a CPU-only machine of this project's kind is
#   the CPU wheel on disk. Elsewhere, install a CPU build of torch first (PyTorch's CPU
#   wheel index) so that pip does not fetch a multi-GB CUDA build.
# - Pins triton and NumPy through constraints.txt (the interpreter needs NumPy < 2.4).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv --system-site-packages .venv
py=.venv/bin/python
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q "torch==2.13.0"
"$py" -m pip install -q -c constraints.txt -e ".[test,bench]"
