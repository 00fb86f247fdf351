# Record of the third device command of 2026-12-07, session 8 (repo root, .whl/ and .diag/ carried), invoked as:
#   LIMIT=585 bash .diag/callP.sh   (this file); 294 s on an NVIDIA H100 80GB HBM3
# Session 8 call 3: the generation recipes on the GPU (recipe 4 newly tested: its warm-up writes undone), where a
# decode step's time goes (batch 1, nf4compile vs bf16; profile_steps' cache now sized for all its steps), Llama-3-8B at batch 8.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L
LIMIT=${LIMIT:-585}
left() { echo $(( LIMIT - SECONDS )); }
cp .diag/callP.sh $L/run-call.sh
(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; python3 -c "import torch,triton,transformers,bitsandbytes,torchao,peft;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__,'bnb',bitsandbytes.__version__,'torchao',torchao.__version__,'peft',peft.__version__)"; date -u +%FT%TZ) > $L/env.txt 2>&1
cat $L/env.txt; echo "LIMIT=$LIMIT"
T=$(( $(left) - 20 )); [ $T -gt 170 ] && T=170
timeout $T python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_models.py -k "cuda_graphs_generate" > $L/cuda-tests.log 2>&1; grep -E "passed|failed|Error" $L/cuda-tests.log | tail -n 8 | cut -c1-300
echo "t=$SECONDS"
B=$(( $(left) - 10 )); [ $B -gt 190 ] && B=190; [ $B -gt 60 ] && timeout $B python3 bench/profile_steps.py decode --configs nf4compile:1,bf16-compiled:1 --out $OUT > $L/profile-decode.log 2>&1; grep -E "^(nf4|bf16)|rror" $L/profile-decode.log | cut -c1-700
echo "t=$SECONDS"
B=$(( $(left) - 8 )); [ $B -gt 90 ] && timeout $B python3 bench/e2e.py --models llama-3-8b --batches 8 --methods nf4compile,bf16-compiled --gpu-budget-s $(( B - 10 )) --out $OUT > $L/e2e-8b-b8.log 2>&1; grep -E "^\{|rror" $L/e2e-8b-b8.log | cut -c1-300 | tail -n 4
echo "t=$SECONDS"
cd $OUT && tar czf logs.tgz logs && rm -rf logs; ls -la $OUT
