# Session 12 call C (calls A's and B's plans merged): Llama-2-7B batch 1 both methods (call B's bf16 run was cut by
# its budget), then M = 64 tuned on Llama-2-7B's three shapes while time lasts.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L; cp .diag/s12c.sh $L/run-call.sh
LIMIT=${LIMIT:-420}
left() { echo $(( LIMIT - SECONDS )); }
timeout 240 python3 bench/e2e.py --models llama-2-7b --batches 1 --methods nf4compile,bf16-compiled --gpu-budget-s 230 --out $OUT > $L/e2e-b1.log 2>&1; grep -E "target|rror" $L/e2e-b1.log | cut -c1-300 | tail -n 8
python3 - <<'PY'
import json, glob, os
for p in sorted(glob.glob(os.environ["OUT"] + "/e2e-*.json")):
    for r in json.load(open(p))["results"]:
        print(p[-25:], r.get("method"), r.get("batch"), r.get("status"), "tok/s", r.get("decode_tok_s"), "prefill_ms", r.get("prefill_ms"), "compile", r.get("compile_s"))
PY
echo "t=$SECONDS"
B=$(( $(left) - 10 ))
[ $B -gt 60 ] && timeout $B python3 bench/nf4_kernels.py --tune --ms 64 --shapes 4096x4096,11008x4096,4096x11008 --torchao-ms "" --suffix=-v8-c --out $OUT > $L/kernels.log 2>&1; echo "kernels rc=$?"
grep -E "M=" $L/kernels.log | head -30
echo "t=$SECONDS"
cd $OUT && tar czf logs.tgz logs && rm -rf logs
