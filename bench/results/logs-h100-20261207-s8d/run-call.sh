# Record of the fourth device command of 2026-12-07, session 8 (repo root, .whl/ and .diag/ carried), invoked as:
#   LIMIT=500 bash .diag/callQ.sh   (this file); 240 s on an NVIDIA H100 80GB HBM3
# Session 8 call 4: the CUDA-marked test suite, then the core and pass tests on the GPU machine's torch 2.11 (QLoRA's and the generation recipes' CUDA tests ran in calls 1 and 3 this session).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L
LIMIT=${LIMIT:-500}
left() { echo $(( LIMIT - SECONDS )); }
cp .diag/callQ.sh $L/run-call.sh
(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; python3 -c "import torch,triton,transformers,bitsandbytes,torchao,peft,expecttest;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__,'bnb',bitsandbytes.__version__,'torchao',torchao.__version__,'peft',peft.__version__)"; date -u +%FT%TZ) > $L/env.txt 2>&1
cat $L/env.txt; echo "LIMIT=$LIMIT"
T=$(( $(left) - 15 )); [ $T -gt 300 ] && T=300
timeout $T python3 -m pytest -v -p no:cacheprovider -m cuda tests --ignore=tests/test_qlora.py -k "not cuda_graphs_generate" --durations=12 > $L/cuda-tests.log 2>&1; echo "pytest rc=$?"
grep -E "FAILED|ERROR|passed|failed" $L/cuda-tests.log | tail -n 25 | cut -c1-250
echo "t=$SECONDS"
T=$(( $(left) - 10 )); [ $T -gt 40 ] && timeout $T python3 -m pytest -q -p no:cacheprovider tests/test_format.py tests/test_tensor.py tests/test_ops.py tests/test_quantize.py tests/test_serialization.py tests/test_passes.py tests/test_export.py > $L/core-tests.log 2>&1; grep -E "FAILED|ERROR|passed|failed" $L/core-tests.log | tail -n 12 | cut -c1-250
echo "t=$SECONDS"
cd $OUT && tar czf logs.tgz logs && rm -rf logs; ls -la $OUT
