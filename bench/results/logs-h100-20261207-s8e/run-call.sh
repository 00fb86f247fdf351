# Record of the fifth device command of 2026-12-07, session 8 (repo root, .whl/ and .diag/ carried), invoked as:
#   T=150 bash .diag/callR.sh   (this file); 87 s on an NVIDIA H100 80GB HBM3; the test then had no xfail mark
# Session 8 call 5: QLoRA under CUDA graphs with and without gradient checkpointing.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
mkdir -p $OUT/logs; cp .diag/callR.sh $OUT/logs/run-call.sh
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/logs/env.txt; date -u +%FT%TZ >> $OUT/logs/env.txt
timeout ${T:-150} python3 -m pytest -v -p no:cacheprovider -m cuda tests/test_qlora.py -k cuda_graphs > $OUT/logs/cuda-tests.log 2>&1; echo "rc=$?"
grep -E "PASSED|FAILED|^E |passed|failed" $OUT/logs/cuda-tests.log | head -20 | cut -c1-250
