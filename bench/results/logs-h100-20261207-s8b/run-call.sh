# Record of the second device command of 2026-12-07, session 8 (repo root, .whl/ and .diag/ carried), invoked as:
#   LIMIT=585 bash .diag/callO.sh   (this file); 434 s on an NVIDIA H100 80GB HBM3. Its decode profile hit a device-side index assert:
#   bench/profile_steps.py sized the StaticCache for 8 steps past the prompt and ran 27 (fixed since).
# Session 8 call 2: where a decode step's time goes (batch 1: nf4compile vs bf16), the batch-4 QLoRA default-mode step
# (255 ms vs 163 ms graphed), Llama-3-8B end to end at batch 1, then the 7B methods never run (unfused, torchao, bnb compiled).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L
LIMIT=${LIMIT:-585}
left() { echo $(( LIMIT - SECONDS )); }
cp .diag/callO.sh $L/run-call.sh
(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; python3 -c "import torch,triton,transformers,bitsandbytes,torchao,peft;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__,'bnb',bitsandbytes.__version__,'torchao',torchao.__version__,'peft',peft.__version__)"; date -u +%FT%TZ) > $L/env.txt 2>&1
cat $L/env.txt; echo "LIMIT=$LIMIT"
B=$(( $(left) - 10 )); [ $B -gt 190 ] && B=190
timeout $B python3 bench/profile_steps.py decode --configs nf4compile:1,bf16-compiled:1 --out $OUT > $L/profile-decode.log 2>&1; grep -E "^(nf4|bf16)|rror" $L/profile-decode.log | cut -c1-600
echo "t=$SECONDS"
B=$(( $(left) - 10 )); [ $B -gt 70 ] && B=70; [ $B -gt 40 ] && timeout $B python3 bench/profile_steps.py qlora --configs nf4compile:4 --out $OUT > $L/profile-qlora.log 2>&1; grep -E "^(nf4|bf16)|rror" $L/profile-qlora.log | cut -c1-600
echo "t=$SECONDS"
B=$(( $(left) - 8 )); [ $B -gt 170 ] && B=170; [ $B -gt 80 ] && timeout $B python3 bench/e2e.py --models llama-3-8b --batches 1 --methods nf4compile,bf16-compiled --gpu-budget-s $(( B - 10 )) --out $OUT > $L/e2e-8b.log 2>&1; grep -E "^\{|target|rror" $L/e2e-8b.log | cut -c1-300 | tail -n 8
echo "t=$SECONDS"
B=$(( $(left) - 8 )); [ $B -gt 80 ] && timeout $B python3 bench/e2e.py --models llama-2-7b --batches 1 --methods nf4compile-unfused,torchao-compiled,bnb-compiled --gpu-budget-s $(( B - 10 )) --out $OUT > $L/e2e-7b.log 2>&1; grep -E "^\{|rror" $L/e2e-7b.log | cut -c1-300 | tail -n 8
echo "t=$SECONDS"
cd $OUT && tar czf logs.tgz logs && rm -rf logs; ls -la $OUT
