#!/usr/bin/env bash
# One entry point for a fresh machine: makes .venv (once), installs lesson9 with its
# dev tools into it, then runs what you ask for.
#   bash tools/dev.sh train [lesson9-train options]   # the main job on the embedded MNIST
#   bash tools/dev.sh test                            # every test: pytest, which runs every notebook twice
#   bash tools/dev.sh lab [jupyter lab options]       # the notebooks in JupyterLab, on this venv's kernel
#   bash tools/dev.sh docs                            # the docs site into docs/_build/html, and README.md
#   bash tools/dev.sh bench [--quick|--device cuda]   # the speed benchmark (bench/README.md)
#
# PyTorch is installed first, when the venv has none, as ${LESSON9_TORCH:-torch==2.13.0}.
# Which build that is depends on where pip finds it: from PyPI, on Linux, `torch==2.13.0` is
# the CUDA build (a ~530 MB wheel that pulls ~3 GB of nvidia-* CUDA, cuDNN and NCCL wheels);
# on macOS and Windows it is the CPU build. A pip configured with a local wheel cache (as on
# this project's CI machines) gets whatever that cache holds. Choose the build with LESSON9_TORCH,
# which may carry pip options:
#   LESSON9_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"    # CPU only, ~200 MB
#   LESSON9_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"  # a given CUDA version
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LESSON9_VENV:-.venv}
py="$venv/bin/python"
say() { echo "dev.sh: $*" >&2; }

if [ ! -x "$py" ]; then
  say "first run: creating the virtual environment $venv (python3 -m venv) ..."
  python3 -m venv "$venv"
fi
stamp="$venv/.lesson9-installed"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ settings.ini -nt "$stamp" ]; then
  t0=$SECONDS
  if ! "$py" -c "import torch" 2>/dev/null; then
    torch_spec=${LESSON9_TORCH:-torch==2.13.0}
    say "installing PyTorch into $venv: pip install $torch_spec"
    if [ -z "${LESSON9_TORCH:-}" ] && [ "$(uname -s)" = Linux ]; then
      say "  from PyPI on Linux this is the CUDA build: ~530 MB plus ~3 GB of CUDA libraries, often 5-10 minutes"
      say "  (a pip set up with a local wheel cache gets the build the cache holds)."
      say "  CPU only (~200 MB): LESSON9_TORCH=\"torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu\" bash tools/dev.sh $*"
    else
      say "  a few hundred MB to a few GB depending on the build; a few minutes."
    fi
    # numpy with it: torch imported without numpy warns "Failed to initialize NumPy"
    # shellcheck disable=SC2086 # LESSON9_TORCH may carry pip options, e.g. an --index-url
    "$py" -m pip install --disable-pip-version-check $torch_spec numpy
    "$py" -c "import torch; print('dev.sh: installed torch', torch.__version__, f'(CUDA {torch.version.cuda} build)' if torch.version.cuda else '(CPU-only build)')" >&2
  fi
  say "installing lesson9 (editable) with its dev tools (nbdev, pytest, Sphinx, JupyterLab ...): about 150 packages, 1-4 minutes ..."
  # pip's own lines are many; one line per 25 packages shows it is moving (pip's errors still reach stderr)
  "$py" -m pip install --disable-pip-version-check --progress-bar off -e ".[dev]" |
    awk '/^(Collecting|Processing|Requirement already satisfied|Obtaining)/ { if (++n % 25 == 0) printf "dev.sh:   %d packages found ...\n", n > "/dev/stderr"; fflush() }
         /^Successfully installed/ { printf "dev.sh:   installed %d new packages\n", NF - 2 > "/dev/stderr" }'
  touch "$stamp"
  say "set-up done in $((SECONDS - t0)) s; later runs skip it."
fi
case "$venv" in /*) venv_dir=$venv ;; *) venv_dir=$PWD/$venv ;; esac   # LESSON9_VENV may be absolute
export PATH="$venv_dir/bin:$PATH"
mplbackend_given=${MPLBACKEND+yes}
export MPLBACKEND=${MPLBACKEND:-Agg}   # headless: the jobs and tests save figures, they never open windows

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  train) exec lesson9-train "$@" ;;
  test)
    # One pytest run reports every part, so a failure in one never hides the others. It includes
    # tests/test_notebooks.py: every notebook in a Jupyter kernel with default threads, and again under
    # nbdev_test with ATen's portable kernels and one thread (another machine's rounding).
    exec python -m pytest -q -rs tests ;;   # -rs: say why a test was skipped (e.g. no Chromium)
  lab)
    # Jupyter's own kernel backend draws pyplot figures in the notebook; Agg would hide them
    [ -z "$mplbackend_given" ] && unset MPLBACKEND
    [ "$(id -u)" = 0 ] && set -- --allow-root "$@"   # root in a container: Jupyter refuses without it
    exec jupyter lab "$@" nbs/ ;;
  docs) exec python tools/build_docs.py "$@" ;;
  bench) exec python bench/run.py "$@" ;;
  *) echo "usage: bash tools/dev.sh train|test|lab|docs|bench [args]" >&2; exit 2 ;;
esac
