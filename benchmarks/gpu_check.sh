#!/usr/bin/env bash
# The GPU checks, in one run: the CUDA tests (unbiasedness on the device, no host
# synchronisation in the estimator work, every tensor of a step on the logits' device), then the
# step-time benchmark at batch 50 and 500 on the GPU. Prints everything; record the output (the
# JSON lines are also written under $OUT, default the current folder).
#
#   bash benchmarks/gpu_check.sh                 # uses .venv/bin/python if present
#   PYTHON=python ROUNDS=10 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
ROUNDS=${ROUNDS:-30}
status=0
echo "== environment"
"$PYTHON" -c "import torch, pyro; print('torch', torch.__version__, 'pyro', pyro.__version__,
      'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
echo "== CUDA tests"
"$PYTHON" -m pytest -v -rs tests/test_cuda.py || status=1
echo "== step time on cuda, batch 50 and 500 (validation on, then off)"
"$PYTHON" -m benchmarks.step_time --device cuda --batch-sizes 50 500 --rounds "$ROUNDS" \
    --json-out "${OUT:-.}/gpu_step_time.json" || status=1
"$PYTHON" -m benchmarks.step_time --device cuda --batch-sizes 50 500 --rounds "$ROUNDS" \
    --no-validation --json-out "${OUT:-.}/gpu_step_time_novalidation.json" || status=1
exit $status
