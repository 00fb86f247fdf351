# Session 12 call A: pairs GEMM candidates (M <= 256) with the shared-memory opt-in. GPU numerics of every candidate
# plan and of the opt-in, the opt-in's host cost, then --tune at M = 4, 8, 16 on the seven shapes.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L; cp .diag/s12a.sh $L/run-call.sh
LIMIT=${LIMIT:-580}
left() { echo $(( LIMIT - SECONDS )); }
(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; python3 -c "import torch,triton,transformers,bitsandbytes,torchao;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__,'bnb',bitsandbytes.__version__,'torchao',torchao.__version__)"; date -u +%FT%TZ) > $L/env.txt 2>&1
cat $L/env.txt
T=tests/test_triton_kernels.py
timeout 240 python3 -m pytest -q -p no:cacheprovider -m cuda "$T::test_pairs_gemm_opts_into_more_than_48_kb_of_shared_memory_cuda" "$T::test_every_candidate_plan_cuda[16-False]" "$T::test_every_candidate_plan_cuda[16-True]" "$T::test_every_candidate_plan_cuda[64-False]" > $L/cuda-tests.log 2>&1; echo "tests rc=$?"; grep -E "passed|failed|FAILED|Error" $L/cuda-tests.log | head -8
echo "t=$SECONDS"
timeout 40 python3 .diag/host_pairs.py > $L/host.log 2>&1; tail -1 $L/host.log
echo "t=$SECONDS"
B=$(( $(left) - 10 ))
timeout $B python3 bench/nf4_kernels.py --tune --ms ${MS:-4,8,16} --torchao-ms "" --suffix=-v8-mm --out $OUT > $L/kernels.log 2>&1; echo "kernels rc=$?"
grep -E "M=" $L/kernels.log | head -30
python3 - <<'PY'
import json, glob, os
for p in glob.glob(os.environ["OUT"] + "/*-v8-mm.json"):
    d = json.load(open(p))
    for t in d.get("tuning", []):
        c = sorted(t["candidates"], key=lambda c: c["us"])
        lk = lambda x: x["plan"].get("config", {}).get("lookup")
        bp = min((x["us"] for x in c if lk(x) == "pairs"), default=None)
        bo = min((x["us"] for x in c if lk(x) != "pairs"), default=None)
        print(t.get("N"), t.get("K"), t.get("M"), "best", round(c[0]["us"], 2), c[0]["plan"].get("config"), "pairs", bp and round(bp, 2), "other", bo and round(bo, 2))
PY
echo "t=$SECONDS"
cd $OUT && tar czf logs.tgz logs && rm -rf logs
