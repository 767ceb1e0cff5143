#!/usr/bin/env bash
# Create .venv (if missing) and install slidemil with everything it needs. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
fi
# torch and torchvision resolve together to a matching pair (the CUDA build also runs on CPU).
.venv/bin/python -m pip install --quiet --progress-bar off -e '.[dev]'
.venv/bin/python -c "import torch, torchvision, openslide, snakemake; print('slidemil environment ready: torch', torch.__version__, '| CUDA' if torch.cuda.is_available() else '| CPU only')"
