# Session 9 call 4: scale-load variants of the prefetching gemv (.diag/tl_exp.py: 1 = block indices contiguous
# along the groups, 2 = + one nested-absmax load per row, 3 = + the dynamic map gathered from shared memory),
# timed against the shipped code (0) on the seven shapes; then Llama-2-7B batch 1 with the best variant if it wins.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L
LIMIT=${LIMIT:-585}
left() { echo $(( LIMIT - SECONDS )); }
cp .diag/callV.sh .diag/tl_exp.py .diag/exp_time.py .diag/e2e_variant.py $L/
(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; date -u +%FT%TZ) > $L/env.txt 2>&1; cat $L/env.txt
timeout 240 python3 .diag/exp_time.py > $L/exp-time.log 2>&1; echo "exp rc=$?"; grep -v Warning $L/exp-time.log | grep -E "us " | head -60
echo "t=$SECONDS"
BEST=$(python3 - <<'PY'
import json, os, collections
d = json.load(open(os.path.join(os.environ["OUT"], "exp-scale-loads.json")))
tot = collections.defaultdict(float); first = {}
for r in d["rows"]:
    k = (r["N"], r["K"]); first.setdefault(k, json.dumps(r["config"], sort_keys=True))
    if json.dumps(r["config"], sort_keys=True) == first[k]: tot[r["variant"]] += r["us"]
best = min(tot, key=tot.get)
print(best if tot[best] < 0.98 * tot[0] and all(r["equal"] for r in d["rows"]) else 0)
PY
)
echo "best variant: $BEST"
B=$(( $(left) - 10 )); [ $B -gt 200 ] && B=200
[ "$BEST" != "0" ] && [ $B -gt 100 ] && timeout $B python3 .diag/e2e_variant.py $BEST --models llama-2-7b --batches 1 --methods nf4compile,bf16-compiled --gpu-budget-s $(( B - 10 )) --out $OUT > $L/e2e-b1.log 2>&1; grep -E "^\{|target|rror" $L/e2e-b1.log | cut -c1-300 | tail -n 8
echo "t=$SECONDS"
cd $OUT && tar czf logs.tgz logs && rm -rf logs; ls -la $OUT
