#!/usr/bin/env bash
# The GPU check, unattended, in at most 9 minutes (scripts/gpu_check.py; its docstring has the details). Seven parts,
# the figures that matter most first: (1) the fast path against the notebook's baseline (resnet56, batch 64);
# (2) a fused group of K = 8 beside K runs packed onto the GPU and K runs one after another, same model, data,
# images, precision and K; (3) the fast path's accuracy, 2 seeds each of it and the baseline loader, 5 epochs on
# synthetic CIFAR-100 of the real size, and a run compiled with CUDA graphs, all at once; (4) each throughput lever
# and torch.compile; (5) 1 and 8 resnet20 runs packed, without MPS and under it where nvidia-cuda-mps-control is on the
# PATH, and one packed run made to run out of GPU memory, which must fail alone; (6) one run's global batch on one
# process and on two (DDP; skipped with one GPU); (7) a 5-run grid through
# `submit --executor local --wait` and `collect`. Each part runs in subprocesses with a time cap, so one that
# fails or hangs leaves the others; the caps leave 60 s of the budget for start-up and writing. Every row is
# kept as soon as it is measured and the files are rewritten after each benchmark, run and part, so a part cut
# off at its cap keeps what it finished. Verdicts are medians of repeated windows and state their spread. Everything lands
# directly in OUT_DIR: summary.md, tables.parquet, env.json, log.txt.
#
#   bash scripts/gpu_check.sh OUT_DIR [--smoke] [--budget SECONDS] [--only speed,fuse,fit,levers,pack,ddp,grid]
#
# cifarbench runs from this tree (PYTHONPATH; nothing is pip-installed) with the python3 on the PATH, which must
# hold torch, torchvision, lightning, torchmetrics, pandas, pyarrow, scipy, matplotlib and pyyaml. submitit, which
# the fuse, pack and grid parts need (the packed runs' job imports it), is installed from wheels in .whl/ when python3 lacks it: a machine without network access
# gets them from this tree. Prepare them once, in the repo root, on a machine that has network access:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       submitit==$(.venv/bin/python -c 'import submitit; print(submitit.__version__)')
#
# (add cloudpickle and typing_extensions the same way for a python3 that lacks them). Without submitit and
# without its wheel, the grid part is skipped with a note, and the packed rows of parts fuse and pack fail.
#
# --smoke runs the same code paths at CPU size (tests/test_gpu_check.py; K = 2, one seed of each loader, no
# torch.compile, and a labelled error stands in for the run out of memory, since a CPU cannot run out of a
# device's memory safely). Exit code: 0 when the files were written, whatever the parts did (summary.md says);
# 2 when OUT_DIR cannot be written or the arguments are wrong.
set -u

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash scripts/gpu_check.sh OUT_DIR [--smoke] [--budget SECONDS] [--only PARTS]" >&2
    exit 2
fi
setup=$(mktemp -d "${TMPDIR:-/tmp}/cifarbench-gpu-check-setup.XXXXXX") || exit 2
trap 'rm -rf "$setup"' EXIT
site=$setup/site
log=$setup/setup.log

wheels=("$root"/.whl/*.whl)
if python3 -c 'import submitit' 2>/dev/null; then
    echo "set-up: submitit $(python3 -c 'import submitit; print(submitit.__version__)') is installed" >"$log"
elif [ -e "${wheels[0]}" ]; then
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        "${wheels[@]}" >"$log" 2>&1; then
        echo "set-up: installed $(cd "$root/.whl" && echo *.whl) from .whl/ into $site" >>"$log"
    else
        echo "set-up: pip could not install .whl/ (output above); the grid part will be skipped" >>"$log"
    fi
else
    echo "set-up: submitit is not installed and .whl/ holds no wheels; the grid part will be skipped" >"$log"
fi

export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}"
python3 "$root/scripts/gpu_check.py" "$@" --setup-log "$log"
