#!/usr/bin/env bash
# Peers for bench/run.py (loop 5: PyTorch Lightning, loop 6: fastai).
#
#   bash bench/setup_peers.sh [python]   # here (package index reachable): bench/.venv-peers with torch 2.13 CPU,
#                                        # lightning and fastai; also keeps fastai's wheels in bench/.wheels-gpu
#   bash bench/setup_peers.sh --offline  # on a lent GPU machine (torch + lightning there, no internet), with
#                                        # bench/.wheels-gpu carried over: installs fastai into bench/.peers-site,
#                                        # which bench/run.py puts on fastai's PYTHONPATH
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
wheels="$here/.wheels-gpu"

if [[ "${1:-}" == "--offline" ]]; then
  py="${2:-python3}"
  "$py" -m pip install -q --no-index --no-deps --find-links "$wheels" --target "$here/.peers-site" \
    -r "$here/requirements-fastai-offline.txt"
  PYTHONPATH="$here/.peers-site" "$py" -c "import fastai.basics, fastai; print('fastai', fastai.__version__, 'ready in bench/.peers-site')"
  exit 0
fi

py="${1:-$(command -v python3.11 || command -v python3)}"
venv="$here/.venv-peers"
"$py" -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install -q --upgrade pip
"$pip" install -q torch==2.13.0          # first, so nothing below can pull a CUDA build
"$pip" install -q -r "$here/requirements-peers.txt"
# fastai pulls torchvision, whose PyPI wheel is a CUDA build: with the CPU torch its C ops fail to register
# ("operator torchvision::nms does not exist") and break `import lightning` and `import fastai`.
# Neither loop needs it (fastai.basics and lightning import without it), so remove it.
"$pip" uninstall -q -y torchvision
"$venv/bin/python" -c "import torch, lightning, fastai.basics, fastai; print(f'peers ready: torch {torch.__version__}, lightning {lightning.__version__}, fastai {fastai.__version__}')"

# wheels for the GPU machines (Python 3.12 there; 3.11 too, to test the offline install here)
for v in 3.12 3.11; do
  "$pip" download -q --no-deps --only-binary=:all: --python-version "$v" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d "$wheels" -r "$here/requirements-fastai-offline.txt"
done
echo "fastai wheels for offline machines in bench/.wheels-gpu ($(du -sh "$wheels" | cut -f1))"
