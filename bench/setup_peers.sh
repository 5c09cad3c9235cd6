#!/usr/bin/env bash
# Create bench/.venv-peers with PyTorch Lightning and fastai for bench/run.py (loops 5 and 6).
# Usage: bash bench/setup_peers.sh [python]   (default: python3.11 if present, else python3)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${1:-$(command -v python3.11 || command -v python3)}"
venv="$here/.venv-peers"
"$py" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q torch==2.13.0          # first, so nothing below can pull a CUDA build
"$venv/bin/pip" install -q -r "$here/requirements-peers.txt"
# fastai pulls torchvision, whose PyPI wheel is a CUDA build: with the CPU torch its C ops fail to register
# ("operator torchvision::nms does not exist") and break `import lightning` and `import fastai`.
# Neither loop needs it (fastai.basics and lightning import without it), so remove it.
"$venv/bin/pip" uninstall -q -y torchvision
"$venv/bin/python" - <<'PY'
import torch, lightning, fastai
print(f"peers ready: torch {torch.__version__}, lightning {lightning.__version__}, fastai {fastai.__version__}")
PY
