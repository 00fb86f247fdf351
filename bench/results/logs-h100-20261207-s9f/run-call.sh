# Session 9 call 6: gemv plans with "scales": "rows" (scale parts in fewer global sectors, the dynamic map read
# from shared memory). GPU numerics of the gemv paths, M = 1 re-tuned on the seven shapes and the
# sibling groups, then Llama-2-7B end to end at batch 1 with the merged plans.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L
LIMIT=${LIMIT:-585}
left() { echo $(( LIMIT - SECONDS )); }
cp .diag/callX.sh $L/run-call.sh
(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; python3 -c "import torch,triton,transformers,bitsandbytes,torchao,peft;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__,'bnb',bitsandbytes.__version__,'torchao',torchao.__version__,'peft',peft.__version__)"; date -u +%FT%TZ) > $L/env.txt 2>&1
cat $L/env.txt; echo "LIMIT=$LIMIT"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_triton_kernels.py -k "gemv or every_candidate_plan_cuda or llama_shapes or unaligned or nested" > $L/cuda-tests.log 2>&1; echo "tests rc=$?"; grep -E "passed|failed|FAILED|Error" $L/cuda-tests.log | head -12
echo "t=$SECONDS"
B=$(( $(left) - 190 )); [ $B -gt 200 ] && B=200
timeout $B python3 bench/nf4_kernels.py --tune --ms 1 --torchao-ms "" --suffix=-v6-m1 --out $OUT > $L/kernels.log 2>&1; echo "kernels rc=$?"
grep -E "M=1 |us_group" $L/kernels.log | cut -c1-200 | head -14
echo "t=$SECONDS"
[ -f $OUT/tuned_configs_h100.json ] && python3 .diag/merge_plans.py $OUT/tuned_configs_h100.json
B=$(( $(left) - 10 )); [ $B -gt 80 ] && timeout $B python3 bench/e2e.py --models llama-2-7b --batches 1 --methods nf4compile,bf16-compiled --gpu-budget-s $(( B - 10 )) --out $OUT > $L/e2e-b1.log 2>&1; grep -E "^\{|target|rror" $L/e2e-b1.log | cut -c1-300 | tail -n 8
echo "t=$SECONDS"
cd $OUT && tar czf logs.tgz logs && rm -rf logs; ls -la $OUT
