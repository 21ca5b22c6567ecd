#!/usr/bin/env bash
# The GPU check, run on a lent device machine through the `device` tool (it has torch, torchvision, numpy,
# scikit-learn, pyarrow, pyyaml, rich, typer; not pydantic or tqdm, which travel as wheels in .whl/):
#   here:  echo /.whl/ >> .git/info/exclude
#          python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#            --platform manylinux_2_17_x86_64 -d .whl pydantic pydantic-core annotated-types typing-inspection tqdm
#   there: bash bench/gpu_check.sh        (carry: .whl; writes $OUT/gpu_check.md)
set -euo pipefail
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 bench/gpu_check.py --out "${OUT:-.}/gpu_check.md"
