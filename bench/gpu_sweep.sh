#!/usr/bin/env bash
# One H100 session in one command: versions, the CUDA-marked tests, the core/pass tests on this torch,
# the README demo, and the end-to-end benchmark. Logs and JSON land in $OUT (bench/results/ locally).
# Needs the wheels the GPU image lacks in .whl/ (bitsandbytes, torchao, expecttest): see README.
set -u
OUT=${OUT:-bench/results}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, transformers, bitsandbytes, torchao; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'bitsandbytes', bitsandbytes.__version__, 'torchao', torchao.__version__)"
  date -u +%FT%TZ
} > "$OUT/gpu-env.txt" 2>&1
cat "$OUT/gpu-env.txt"
timeout "${CUDA_TESTS_S:-240}" python3 -m pytest -q -m cuda -p no:cacheprovider tests > "$OUT/gpu-cuda-tests.log" 2>&1
tail -5 "$OUT/gpu-cuda-tests.log"
timeout "${CORE_TESTS_S:-150}" python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_format.py tests/test_tensor.py \
  tests/test_ops.py tests/test_quantize.py tests/test_serialization.py tests/test_passes.py tests/test_export.py \
  > "$OUT/gpu-core-tests.log" 2>&1
tail -5 "$OUT/gpu-core-tests.log"
timeout 90 python3 -m nf4compile demo > "$OUT/gpu-demo.log" 2>&1
cat "$OUT/gpu-demo.log" | grep -v Warning
[ "${E2E_BUDGET_S:-0}" -gt 0 ] && timeout $((E2E_BUDGET_S + 40)) python3 bench/e2e.py --out "$OUT" --gpu-budget-s "$E2E_BUDGET_S" > "$OUT/gpu-e2e.log" 2>&1
tail -25 "$OUT/gpu-e2e.log" 2>/dev/null
exit 0
