#!/usr/bin/env bash
# Issue #6 on one GPU in one call (about 3 minutes on an H100): the property tests with the "gpu"
# hypothesis profile (shapes up to 4097; quantization bound, determinism, CPU vs Triton vs CUDA agreement
# on every kernel path), the cuda-marked hardening tests, and the peak GPU memory of a Llama-2-7B-shaped
# streamed quantize (bench/stream_memory.py). Logs and JSON land in $OUT (bench/results/ locally).
# Each step has its own time limit, so one slow step cannot take the others' results with it.
#   EXAMPLES=12 (hypothesis examples per property; an example takes ~1-3 s: new kernel variants to
#   compile, CPU references of weights up to 4097 x 4097)
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then  # optional: torchao/bitsandbytes are not needed by these tests
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, transformers, hypothesis; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'hypothesis', hypothesis.__version__)"
  date -u +%FT%TZ
} > "$OUT/hardening-env.txt" 2>&1
cat "$OUT/hardening-env.txt"

start=$SECONDS
NF4COMPILE_HYPOTHESIS=gpu NF4COMPILE_HYPOTHESIS_EXAMPLES=${EXAMPLES:-12} timeout 75 \
  python3 -m pytest -v -p no:cacheprovider tests/test_properties.py --hypothesis-show-statistics -rfE \
  > "$OUT/hardening-properties.log" 2>&1
echo "properties: rc=$? in $((SECONDS - start)) s"; grep -E "PASSED|FAILED|SKIPPED|ERROR|passing examples|Falsifying" "$OUT/hardening-properties.log" | head -40

start=$SECONDS
timeout 50 python3 -m pytest -v -p no:cacheprovider -m cuda tests/test_hardening.py -rfE -s \
  > "$OUT/hardening-cuda-tests.log" 2>&1
echo "cuda tests: rc=$? in $((SECONDS - start)) s"; grep -E "PASSED|FAILED|SKIPPED|ERROR|^E |bf16=" "$OUT/hardening-cuda-tests.log" | head -40

start=$SECONDS
timeout 55 python3 bench/stream_memory.py --device cuda --shape llama-2-7b --out "$OUT/stream-memory-cuda.json" \
  > "$OUT/stream-memory-cuda.log" 2>&1
echo "stream memory: rc=$? in $((SECONDS - start)) s"; tail -25 "$OUT/stream-memory-cuda.log"
exit 0
