# Session 9 call 1: the scale-after-dot mm candidates. GPU numerics of every candidate plan (M = 16, 64), then
# --tune at M = 4, 8, 16, 64 on the seven shapes (new candidates against the old), then Llama-2-7B end to end at
# batch 8 with the freshly tuned plans merged over the shipped ones.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L
LIMIT=${LIMIT:-585}
left() { echo $(( LIMIT - SECONDS )); }
cp .diag/callS.sh $L/run-call.sh
(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; python3 -c "import torch,triton,transformers,bitsandbytes,torchao,peft;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__,'bnb',bitsandbytes.__version__,'torchao',torchao.__version__,'peft',peft.__version__)"; date -u +%FT%TZ) > $L/env.txt 2>&1
cat $L/env.txt; echo "LIMIT=$LIMIT"
timeout 90 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_triton_kernels.py -k "every_candidate_plan_cuda" > $L/cuda-tests.log 2>&1; echo "tests rc=$?"; tail -n 3 $L/cuda-tests.log
echo "t=$SECONDS"
B=$(( $(left) - 200 )); [ $B -gt 330 ] && B=330
timeout $B python3 bench/nf4_kernels.py --tune --ms 4,8,16,64 --torchao-ms "" --suffix=-v5-mm --out $OUT > $L/kernels.log 2>&1; echo "kernels rc=$?"
grep -E "^[0-9]+x|fused|copy" $L/kernels.log | head -5
echo "t=$SECONDS"
[ -f $OUT/tuned_configs_h100.json ] && python3 .diag/merge_plans.py $OUT/tuned_configs_h100.json
B=$(( $(left) - 10 )); [ $B -gt 80 ] && timeout $B python3 bench/e2e.py --models llama-2-7b --batches 8 --methods nf4compile,bf16-compiled --gpu-budget-s $(( B - 10 )) --out $OUT > $L/e2e-b8.log 2>&1; grep -E "^\{|target|rror" $L/e2e-b8.log | cut -c1-300 | tail -n 8
echo "t=$SECONDS"
cd $OUT && tar czf logs.tgz logs && rm -rf logs; ls -la $OUT
