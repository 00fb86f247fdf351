# Session 12 call E: the whole cuda-marked suite on the shipped (twelfth-session) plans, as far as the time allows.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L; cp .diag/s12e.sh $L/run-call.sh
(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c "import torch,triton,transformers;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__)"; date -u +%FT%TZ) > $L/env.txt 2>&1; cat $L/env.txt
timeout ${T:-300} python3 -m pytest -q -p no:cacheprovider -m cuda -rfEs --durations=12 tests/test_triton_kernels.py tests/test_cuda.py tests/test_models.py tests/test_hardening.py tests/test_compile.py tests/test_qlora.py tests/test_pretrained.py tests/test_bench_e2e.py tests/test_distributed.py tests/test_real_weights.py > $L/cuda-suite.log 2>&1; echo "rc=$?"
grep -E "passed|failed|FAILED|ERROR|SKIPPED" $L/cuda-suite.log | tail -20
cd $OUT && tar czf logs.tgz logs && rm -rf logs
