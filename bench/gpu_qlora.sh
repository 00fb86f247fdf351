#!/usr/bin/env bash
# One GPU call for QLoRA: versions, tests/test_qlora.py (its CPU tests on this torch, and the CUDA ones), then
# bench/qlora.py within BENCH_BUDGET_S. Logs, JSON and PNG land in $OUT (bench/results/ locally).
# Needs the wheels the GPU image lacks in .whl/ (bitsandbytes, torchao, expecttest, peft): see README.
set -u
OUT=${OUT:-bench/results}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, transformers, bitsandbytes, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'bitsandbytes', bitsandbytes.__version__, 'peft', peft.__version__)"
  date -u +%FT%TZ
} > "$OUT/qlora-gpu-env.txt" 2>&1
cat "$OUT/qlora-gpu-env.txt"
timeout "${TESTS_S:-120}" python3 -m pytest -q -p no:cacheprovider tests/test_qlora.py > "$OUT/qlora-gpu-tests.log" 2>&1
tail -25 "$OUT/qlora-gpu-tests.log"
BENCH_BUDGET_S=${BENCH_BUDGET_S:-240}
timeout $((BENCH_BUDGET_S + 60)) python3 bench/qlora.py --out "$OUT" --gpu-budget-s "$BENCH_BUDGET_S" > "$OUT/qlora-gpu-bench.log" 2>&1
grep -v "Warning\|warn" "$OUT/qlora-gpu-bench.log" | tail -30
exit 0
