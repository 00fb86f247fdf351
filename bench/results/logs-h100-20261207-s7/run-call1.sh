# Record of the first device command of 2026-12-07, session 7 (run from the repo root with .whl/ carried), invoked as:
#   LIMIT=585 bash run-call1.sh
# bench/qlora.py then took peak memory over the timed steps only: its -graphs rows' peak_gb miss the CUDA-graph pool
# (README, QLoRA benchmark); the script now takes it over all steps. Later start attempts for a re-run were all refused.
# Session 7 call 1: QLoRA with CUDA graphs (all methods), e2e batch 8 and ungrouped batch 1.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L
LIMIT=${LIMIT:-585}
left() { echo $(( LIMIT - SECONDS )); }
(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; python3 -c "import torch,triton,transformers,bitsandbytes,torchao,peft;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__,'bnb',bitsandbytes.__version__,'torchao',torchao.__version__,'peft',peft.__version__)"; date -u +%FT%TZ; md5sum ops/tuned_configs_*.json) > $L/env.txt 2>&1
cat $L/env.txt; echo "LIMIT=$LIMIT"
timeout 260 python3 bench/qlora.py --methods nf4compile-graphs,bf16-graphs,nf4compile,bf16-compiled,bnb-eager --gpu-budget-s 250 --warmup 4 --steps 20 --out $OUT > $L/qlora.log 2>&1; grep -E "^\{|target" $L/qlora.log | cut -c1-260 | tail -n 26
echo "t=$SECONDS"
B=$(( $(left) - 12 )); [ $B -gt 100 ] && timeout $B python3 bench/e2e.py --models llama-2-7b --batches 8 --methods nf4compile,bf16-compiled --gpu-budget-s $(( B - 10 )) --out $OUT > $L/e2e-b8.log 2>&1; grep -E "^\{|target|rror" $L/e2e-b8.log | cut -c1-300 | tail -n 8
echo "t=$SECONDS"
B=$(( $(left) - 8 )); [ $B -gt 60 ] && timeout $B python3 bench/e2e.py --models llama-2-7b --batches 1 --methods nf4compile-ungrouped --gpu-budget-s $(( B - 5 )) --out $OUT > $L/e2e-ungrouped.log 2>&1; grep -E "^\{|rror" $L/e2e-ungrouped.log | cut -c1-300 | tail -n 4
echo "t=$SECONDS"
cd $OUT && tar czf logs.tgz logs && rm -rf logs; ls -la $OUT
