#!/usr/bin/env bash
# One entry point for a fresh machine: makes .venv (once), installs lesson9 with its
# dev tools into it, then runs what you ask for.
#   bash tools/dev.sh train [lesson9-train options]   # the main job on the embedded MNIST
#   bash tools/dev.sh test                            # every notebook (nbdev_test) + pytest
#   bash tools/dev.sh docs                            # the docs site into docs/_build/html, and README.md
#   bash tools/dev.sh bench [--quick|--device cuda]   # the speed benchmark (bench/README.md)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LESSON9_VENV:-.venv}
py="$venv/bin/python"

if [ ! -x "$py" ]; then
  python3 -m venv "$venv"
fi
stamp="$venv/.lesson9-installed"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ settings.ini -nt "$stamp" ]; then
  # torch first, pinned to a CPU build when none is installed: a bare `torch` requirement
  # would pull a multi-GB CUDA build. Override with LESSON9_TORCH (e.g. "torch==2.5.1").
  if ! "$py" -c "import torch" 2>/dev/null; then
    # shellcheck disable=SC2086 # LESSON9_TORCH may carry pip options, e.g. an --index-url
    "$py" -m pip install -q --disable-pip-version-check ${LESSON9_TORCH:-torch==2.13.0}
  fi
  "$py" -m pip install -q --disable-pip-version-check -e ".[dev]"
  touch "$stamp"
fi
export PATH="$PWD/$venv/bin:$PATH"
export MPLBACKEND=${MPLBACKEND:-Agg}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  train) exec lesson9-train "$@" ;;
  test)
    # two notebooks at a time on two cores: one torch thread each, or they oversubscribe the cores
    OMP_NUM_THREADS=1 nbdev_test --n_workers 2
    python -m pytest -q tests ;;
  docs) exec python tools/build_docs.py "$@" ;;
  bench) exec python bench/run.py "$@" ;;
  *) echo "usage: bash tools/dev.sh train|test|docs|bench [args]" >&2; exit 2 ;;
esac
