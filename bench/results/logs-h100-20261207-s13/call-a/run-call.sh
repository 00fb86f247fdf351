# Session 13 call A (prepared in session 12): the maxnreg pairs GEMV candidates, never run on a GPU. GPU numerics of
# every M = 1 candidate, then M = 1 tuned on the seven shapes and the sibling groups (merge with .diag/merge_plans.py,
# then restore the JSON note), then the cuda tests the twelfth session's device time did not reach.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L; cp .diag/s13a.sh $L/run-call.sh
LIMIT=${LIMIT:-580}
left() { echo $(( LIMIT - SECONDS )); }
(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; python3 -c "import torch,triton,transformers,bitsandbytes,torchao;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__,'bnb',bitsandbytes.__version__,'torchao',torchao.__version__)"; date -u +%FT%TZ) > $L/env.txt 2>&1
cat $L/env.txt
T=tests/test_triton_kernels.py
timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda $T -k "pairs or every_candidate_plan_cuda" > $L/cuda-tests.log 2>&1; echo "tests rc=$?"; grep -E "passed|failed|FAILED|Error" $L/cuda-tests.log | head -8
echo "t=$SECONDS"
B=$(( $(left) - 200 )); [ $B -gt 250 ] && B=250
timeout $B python3 bench/nf4_kernels.py --tune --ms 1 --torchao-ms "" --suffix=-v9-m1 --out $OUT > $L/kernels.log 2>&1; echo "kernels rc=$?"
grep -E "M=1 " $L/kernels.log | head -10
echo "t=$SECONDS"
B=$(( $(left) - 10 ))
timeout $B python3 -m pytest -q -p no:cacheprovider -m cuda -rfEs tests/test_qlora.py tests/test_hardening.py tests/test_compile.py tests/test_pretrained.py tests/test_models.py > $L/cuda-rest.log 2>&1; echo "rc=$?"; tail -n 5 $L/cuda-rest.log
cd $OUT && tar czf logs.tgz logs && rm -rf logs
