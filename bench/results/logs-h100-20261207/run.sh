# Record of the device command of 2026-12-07 (run from the repo root with .whl/ carried), invoked as:
#   LIMIT=380 TT=35 TMAX=60 SHAPES=4096x4096,11008x4096,4096x11008 MS=1 METHODS=nf4compile,bf16-compiled bash run.sh
# .diag/merge_plans.py (not kept) merged the freshly tuned plans over ops/tuned_configs_h100.json by (x_at_w, N, K, m_bucket).
# The -k filter below selected no test; cuda-tests-partial.log is the second call's pytest -m cuda tests/test_triton_kernels.py.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L
LIMIT=${LIMIT:-585}
left() { echo $(( LIMIT - SECONDS )); }
(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; python3 -c "import torch,triton,transformers,bitsandbytes,torchao,peft;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__,'bnb',bitsandbytes.__version__,'torchao',torchao.__version__,'peft',peft.__version__)"; date -u +%FT%TZ) > $L/env.txt 2>&1
cat $L/env.txt; echo "LIMIT=$LIMIT"
timeout ${TT:-70} python3 -m pytest -q -x -p no:cacheprovider -m cuda tests/test_triton_kernels.py -k "group or gemv or shipped or borrow" > $L/kernel-tests.log 2>&1; tail -n 2 $L/kernel-tests.log | cut -c1-300
echo "t=$SECONDS"
T=$(( $(left) * 2 / 5 )); [ $T -gt ${TMAX:-205} ] && T=${TMAX:-205}
timeout $T python3 bench/nf4_kernels.py ${SHAPES:+--shapes $SHAPES} ${MS:+--ms $MS} --tune --suffix=-v4 --torchao-budget-s 10 --out $OUT > $L/kernels-v4.log 2>&1; tail -n 12 $L/kernels-v4.log | cut -c1-300
for f in $OUT/tuned_configs_*.json; do [ -f $f ] && python3 .diag/merge_plans.py $f; done; echo "t=$SECONDS"
B=$(( $(left) - 95 )); timeout $B python3 bench/e2e.py --models llama-2-7b --batches 1 --methods ${METHODS:-nf4compile,bf16-compiled,nf4compile-ungrouped} --gpu-budget-s $(( B - 8 )) --out $OUT > $L/e2e.log 2>&1; grep -E "^\{|target" $L/e2e.log | cut -c1-300 | tail -n 8
echo "t=$SECONDS"
B=$(( $(left) - 6 )); [ $B -gt 40 ] && timeout $B python3 bench/profile_steps.py qlora --configs nf4compile:1,bf16-compiled:1 --out $OUT > $L/prof-qlora.log 2>&1; grep -E "^nf4|^bf16" $L/prof-qlora.log | cut -c1-700
echo "t=$SECONDS"
cd $OUT && tar czf logs.tgz logs && rm -rf logs; ls -la $OUT
