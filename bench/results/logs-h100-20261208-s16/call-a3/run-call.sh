# Session 16 call A3 (inline, on the machine call A2 left warm): bf16 compiled at batch 8, the baseline call A2's
# budget skipped, on the same machine.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1; mkdir -p $OUT/logs; timeout 140 python3 bench/e2e.py --models llama-2-7b --batches 8 --methods bf16-compiled --gpu-budget-s 130 --out $OUT > $OUT/logs/e2e-b8-bf16.log 2>&1; echo rc=$?; grep -E "^\{" $OUT/logs/e2e-b8-bf16.log | cut -c1-300
