# Session 11, second call on the same warm H100 (right after run-call.sh, whose tuned plans were merged into
# ops/tuned_configs_h100.json before this call): Llama-2-7B end to end at batch 1. Triton's cache held the GEMV
# kernels the first call had compiled while tuning, so nf4compile's warm-up here built fewer kernels than a cold one.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1; mkdir -p $OUT/logs; timeout 195 python3 bench/e2e.py --models llama-2-7b --batches 1 --methods nf4compile,bf16-compiled --gpu-budget-s 185 --out $OUT > $OUT/logs/e2e-b1.log 2>&1; echo rc=$?; grep -E "^\{|target" $OUT/logs/e2e-b1.log | cut -c1-600
