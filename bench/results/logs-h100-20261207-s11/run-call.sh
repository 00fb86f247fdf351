# Session 11, one short call: GPU numerics of the "pairs" plans (their PTX path) and of every gemv candidate; M = 1
# tuned with the pairs candidates on the largest shape and Llama-2-7B's (with their sibling groups), plans merged;
# Llama-2-7B end to end at batch 1 (nf4compile, bf16 compiled) with the warm-up's breakdown.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L; cp .diag/s11a.sh $L/run-call.sh
LIMIT=${LIMIT:-470}
# End to end only where the targets are set (an H100); elsewhere the whole time tunes.
case "$(nvidia-smi --query-gpu=name --format=csv,noheader)" in *H100*) E2E=${E2E:-1};; *) E2E=${E2E:-0};; esac
left() { echo $(( LIMIT - SECONDS )); }
(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; python3 -c "import torch,triton,transformers,bitsandbytes,torchao;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__,'bnb',bitsandbytes.__version__,'torchao',torchao.__version__)"; date -u +%FT%TZ) > $L/env.txt 2>&1
cat $L/env.txt
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py -k "pairs" > $L/cuda-tests-pairs.log 2>&1; echo "tests rc=$?"; grep -E "passed|failed|FAILED|Error" $L/cuda-tests-pairs.log | head -8
echo "t=$SECONDS"
if [ "${E2E:-1}" = 1 ]; then B=$(( $(left) - 215 )); [ $B -gt 200 ] && B=200; else B=$(( $(left) - 15 )); fi
timeout $B python3 bench/nf4_kernels.py --tune --ms 1 --shapes 28672x8192,4096x4096,11008x4096,4096x11008 --torchao-ms "" --suffix=-v7-m1 --out $OUT > $L/kernels.log 2>&1; echo "kernels rc=$?"
python3 - <<'PY'
import json, glob, os
for p in glob.glob(os.environ["OUT"] + "/*-v7-m1.json"):
    d = json.load(open(p))
    for t in d.get("tuning", []):
        c = sorted(t["candidates"], key=lambda c: c["us"])
        bp = min((x["us"] for x in c if x["plan"].get("config", {}).get("lookup") == "pairs"), default=None)
        bo = min((x["us"] for x in c if x["plan"].get("config", {}).get("lookup") != "pairs"), default=None)
        print(t.get("N"), t.get("K"), t.get("M"), t.get("group"), "best", round(c[0]["us"], 2), c[0]["plan"].get("config"), "pairs", bp and round(bp, 2), "other", bo and round(bo, 2))
PY
echo "t=$SECONDS"
for f in $OUT/tuned_configs_*.json; do [ -f "$f" ] && python3 .diag/merge_plans.py $f; done
B=$(( $(left) - 8 )); [ "${E2E:-1}" = 1 ] && [ $B -gt 80 ] && timeout $B python3 bench/e2e.py --models llama-2-7b --batches 1 --methods nf4compile,bf16-compiled --gpu-budget-s $(( B - 10 )) --out $OUT > $L/e2e-b1.log 2>&1; grep -E "target|rror" $L/e2e-b1.log | cut -c1-300 | tail -n 8
python3 - <<'PY'
import json, glob, os
for p in glob.glob(os.environ["OUT"] + "/e2e-*.json"):
    for r in json.load(open(p))["results"]:
        print(r.get("method"), r.get("batch"), r.get("status"), "tok/s", r.get("decode_tok_s"), "prefill_ms", r.get("prefill_ms"), "compile", r.get("compile_s"), "warm-up prefill", r.get("compile_prefill_s"), r.get("compile_phases_s"))
PY
echo "t=$SECONDS"
cd $OUT && tar czf logs.tgz logs && rm -rf logs
