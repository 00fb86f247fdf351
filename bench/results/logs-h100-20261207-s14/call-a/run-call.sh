# Session 14 call A (prepared in session 13): Llama-2-7B end to end with cold compile caches at batch 8 (nf4compile, now
# grouped at decode batches; bf16 compiled; nf4compile-ungrouped) and batch 1 (nf4compile, bf16 compiled): the batch-8
# grouping's first end-to-end run and the compile-time target's first cold measurement.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L; cp .diag/s14a.sh $L/run-call.sh
LIMIT=${LIMIT:-570}
left() { echo $(( LIMIT - SECONDS )); }
(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; python3 -c "import torch,triton,transformers;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__)"; date -u +%FT%TZ) > $L/env.txt 2>&1
cat $L/env.txt
B=$(( $(left) - 200 ))
timeout $B python3 bench/e2e.py --models llama-2-7b --batches 8 --methods nf4compile,bf16-compiled,nf4compile-ungrouped --gpu-budget-s $(( B - 30 )) --out $OUT > $L/e2e-b8.log 2>&1; echo "e2e b8 rc=$?"
grep -E "^\{|target" $L/e2e-b8.log | cut -c1-420
B=$(( $(left) - 10 ))
timeout $B python3 bench/e2e.py --models llama-2-7b --batches 1 --methods nf4compile,bf16-compiled --gpu-budget-s $(( B - 30 )) --out $OUT > $L/e2e-b1.log 2>&1; echo "e2e b1 rc=$?"
grep -E "^\{|target" $L/e2e-b1.log | cut -c1-420
cd $OUT && tar czf logs.tgz logs && rm -rf logs
