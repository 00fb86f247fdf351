# Session 12 call B (after call A's M = 4-16 plans were merged into ops/tuned_configs_h100.json): Llama-2-7B end to
# end at batch 8 and 1 with the shipped plans, then M = 1 tuned on the three shapes the eleventh session left
# (pairs candidates), then M = 64 (pairs GEMM tiles) while time lasts.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L; cp .diag/s12b.sh $L/run-call.sh
LIMIT=${LIMIT:-580}
left() { echo $(( LIMIT - SECONDS )); }
(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; python3 -c "import torch,triton,transformers,bitsandbytes,torchao;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__,'bnb',bitsandbytes.__version__,'torchao',torchao.__version__)"; date -u +%FT%TZ) > $L/env.txt 2>&1
cat $L/env.txt
for b in ${BATCHES:-8 1}; do
  B=$(( $(left) - 10 )); [ $B -gt 200 ] && B=200
  [ $B -gt 80 ] && timeout $B python3 bench/e2e.py --models llama-2-7b --batches $b --methods nf4compile,bf16-compiled --gpu-budget-s $(( B - 10 )) --out $OUT > $L/e2e-b$b.log 2>&1; grep -E "target|rror" $L/e2e-b$b.log | cut -c1-300 | tail -n 8
  echo "t=$SECONDS"
done
python3 - <<'PY'
import json, glob, os
for p in sorted(glob.glob(os.environ["OUT"] + "/e2e-*.json")):
    for r in json.load(open(p))["results"]:
        print(p[-25:], r.get("method"), r.get("batch"), r.get("status"), "tok/s", r.get("decode_tok_s"), "prefill_ms", r.get("prefill_ms"), "compile", r.get("compile_s"))
PY
B=$(( $(left) - 10 ))
[ $B -gt 60 ] && timeout $B python3 bench/nf4_kernels.py --tune --ms ${MS:-1,64} --shapes 14336x4096,4096x14336,8192x28672,28672x8192 --torchao-ms "" --suffix=-v8-b --out $OUT > $L/kernels.log 2>&1; echo "kernels rc=$?"
grep -E "M=" $L/kernels.log | head -30
echo "t=$SECONDS"
cd $OUT && tar czf logs.tgz logs && rm -rf logs
