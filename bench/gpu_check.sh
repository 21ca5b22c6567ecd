#!/usr/bin/env bash
# The GPU check, run on a lent device machine through the `device` tool (it has torch, torchvision, numpy,
# scikit-learn, pyarrow, pyyaml, rich, typer, tqdm, pytest; not pydantic, which travels as wheels in .whl/
# with a typing-extensions new enough for it):
#   here:  echo /.whl/ >> .git/info/exclude
#          python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#            --platform manylinux_2_17_x86_64 -d .whl pydantic pydantic-core annotated-types typing-inspection typing-extensions
#   there: bash bench/gpu_check.sh        (carry: .whl; writes gpu_tests.txt, gpu_check.md, gpu_profile.txt to $OUT)
# The CUDA tests run first; a failure there is reported and becomes the exit status, but the
# benchmark still runs.
set -euo pipefail
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
tests=0
python3 -m pytest -q -p no:cacheprovider --timeout 300 tests/test_cuda.py \
  tests/test_data.py::test_batches_on_cuda_with_cpu_generator 2>&1 | tee "${OUT:-.}/gpu_tests.txt" || tests=$?
echo "gpu tests: pytest exit status $tests"
python3 bench/gpu_check.py --out "${OUT:-.}/gpu_check.md"
exit "$tests"
