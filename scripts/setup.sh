#!/usr/bin/env bash
# Sets up metakernels on a fresh machine: a venv in .venv (or $METAKERNELS_VENV), torch 2.13.0 (CPU build)
# and triton 3.8.0 pinned, the C++ extension built against that torch, the test tools and the peer
# libraries the tests cross-check against. Idempotent: a second run only re-checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${METAKERNELS_VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip setuptools wheel
# Pinned: an unpinned `torch` pulls a multi-GB CUDA build; these two install from local disk here.
"$PIP" install -q torch==2.13.0 triton==3.8.0
"$PIP" install -q torch==2.13.0 ninja numpy tqdm matplotlib pytest hypothesis expecttest ruff
# --no-build-isolation: build the extension against the torch just installed, not a fresh download.
"$PIP" install -q --no-build-isolation --no-deps -e .
if [ -x scripts/install_peers.sh ] || [ -f scripts/install_peers.sh ]; then
  bash scripts/install_peers.sh "$VENV"
fi
"$VENV/bin/python" - <<'PY'
import torch, metakernels
print(f"metakernels {metakernels.__version__}, torch {torch.__version__}, "
      f"extension_available={metakernels.extension_available()} {metakernels.extension_error() or ''}")
PY
