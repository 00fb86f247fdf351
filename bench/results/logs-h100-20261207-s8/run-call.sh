# Record of the first device command of 2026-12-07, session 8 (run from the repo root with .whl/ and .diag/ carried), invoked as:
#   LIMIT=585 bash .diag/callN.sh   (this file); 263 s on an NVIDIA H100 80GB HBM3
# Session 8 call 1: QLoRA CUDA-graph methods + bnb eager (peak memory over all steps), the CUDA QLoRA tests, then M = 1 kernels on the big shapes.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L
LIMIT=${LIMIT:-585}
left() { echo $(( LIMIT - SECONDS )); }
cp .diag/callN.sh $L/run-call.sh
(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; python3 -c "import torch,triton,transformers,bitsandbytes,torchao,peft;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__,'bnb',bitsandbytes.__version__,'torchao',torchao.__version__,'peft',peft.__version__)"; date -u +%FT%TZ; md5sum ops/tuned_configs_*.json) > $L/env.txt 2>&1
cat $L/env.txt; echo "LIMIT=$LIMIT"
B=$(( $(left) - 20 )); [ $B -gt 160 ] && B=160
timeout $B python3 bench/qlora.py --methods nf4compile-graphs,bf16-graphs,bnb-eager --gpu-budget-s $(( B - 8 )) --warmup 4 --steps 20 --out $OUT > $L/qlora.log 2>&1; grep -E "^\{|target" $L/qlora.log | grep -v None | cut -c1-260 | tail -n 14
echo "t=$SECONDS"
T=$(( $(left) - 10 )); [ $T -gt 120 ] && T=120; [ $T -gt 30 ] && timeout $T python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_qlora.py > $L/cuda-tests.log 2>&1; grep -E "passed|failed|Error" $L/cuda-tests.log | tail -n 6 | cut -c1-300
echo "t=$SECONDS"
T=$(( $(left) - 12 )); [ $T -gt 60 ] && timeout $T python3 bench/nf4_kernels.py --shapes 28672x8192,8192x28672,14336x4096,4096x14336 --ms 1 --tune --suffix=-v4-m1 --torchao-ms "" --out $OUT > $L/kernels.log 2>&1; grep -v Warn $L/kernels.log | grep -E "M=|dequant" | cut -c1-200 | tail -n 12
echo "t=$SECONDS"
cd $OUT && tar czf logs.tgz logs && rm -rf logs; ls -la $OUT
