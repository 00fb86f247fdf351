# Session 13, the one call device time allows after refused starts: sibling groups at a few rows (the mm kernel over 2-3
# weights) and programmatic dependent launch (NF4COMPILE_PDL=1), both built this session: GPU tests of both, group_ab.py,
# Llama-2-7B end to end with cold compile caches at batch 8 (nf4compile now grouped, bf16 compiled, nf4compile-ungrouped
# while time lasts); the PDL A/B of three shapes' kernels (pdl_ab.py).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L; cp .diag/s13g.sh $L/run-call.sh; cp .diag/group_ab.py $L/
# On an H200 (the same GH100 chip, more and faster HBM) the dispatcher reads the H100's plans: none are tuned for it.
nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && cp ops/tuned_configs_h100.json ops/tuned_configs_h200.json && echo "H200: H100 plans"
LIMIT=${LIMIT:-560}
left() { echo $(( LIMIT - SECONDS )); }
(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; python3 -c "import torch,triton,transformers;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__)"; date -u +%FT%TZ) > $L/env.txt 2>&1
cat $L/env.txt
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py -k "group or programmatic" > $L/cuda-tests.log 2>&1; echo "tests rc=$?"; tail -n 2 $L/cuda-tests.log
timeout 45 python3 .diag/group_ab.py > $L/group-ab.log 2>&1; echo "group_ab rc=$?"; grep "^{" $L/group-ab.log | cut -c1-300
cp .diag/pdl_ab.py $L/; timeout 40 python3 .diag/pdl_ab.py > $L/pdl-ab.log 2>&1; echo "pdl_ab rc=$?"; grep "^{" $L/pdl-ab.log | cut -c1-330
echo "t=$SECONDS"
B=$(( $(left) - 10 ))
mkdir -p $OUT/b8 $OUT/b1
[ $B -gt 150 ] && timeout $B python3 bench/e2e.py --models llama-2-7b --batches 8 --methods nf4compile,bf16-compiled,nf4compile-ungrouped --gpu-budget-s $(( B - 30 )) --out $OUT/b8 > $L/e2e-b8.log 2>&1; echo "e2e b8 rc=$?"
grep -E "^\{|target" $L/e2e-b8.log | cut -c1-420
cd $OUT && tar czf logs.tgz logs && rm -rf logs
