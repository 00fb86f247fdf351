# Session 15 call A: the mma.sync NF4 GEMV (nf4_mma_gemv, built this session) checked against fp64 and timed against
# the shipped plans and bf16 on the Llama shapes at M = 1, 2, 4, 8 (its winners, >= 1% faster in the same run,
# merged into this machine's plans and kept in /tmp for call B's end-to-end run, .diag/s15c.sh); every kernel test
# on the GPU (8 shards in parallel); M = 1 with the shipped plans (the one-row gemv after its rework, vs v9-m1).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L; cp .diag/s15b.sh $L/run-call.sh
LIMIT=${LIMIT:-400}
left() { echo $(( LIMIT - SECONDS )); }
(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; python3 -c "import torch,triton,transformers;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__)"; date -u +%FT%TZ) > $L/env.txt 2>&1
cat $L/env.txt
CHIP=h100; case "$(head -1 $L/env.txt)" in *H200*) CHIP=h200; cp ops/tuned_configs_h100.json ops/tuned_configs_h200.json;; esac
cp ops/tuned_configs_$CHIP.json /tmp/shipped-plans.json
timeout 150 python3 .diag/mma_ab.py $OUT/mma 4096x4096,11008x4096,4096x11008,28672x8192,8192x28672 1,8,4 > $L/mma.log 2>&1; echo "mma rc=$? t=$SECONDS"
grep -v -E "Warn|Failed to load|KernelPref" $L/mma.log | cut -c1-330
F=$OUT/mma/tuned_configs_$CHIP.json; [ -f $F ] && python3 .diag/merge_plans.py $F
cp ops/tuned_configs_$CHIP.json $OUT/merged-plans.json; cp ops/tuned_configs_$CHIP.json /tmp/merged-plans-$CHIP.json
cp /tmp/shipped-plans.json ops/tuned_configs_$CHIP.json
python3 -m pytest -q --collect-only -p no:cacheprovider tests/test_triton_kernels.py -k "mma or gemv_rows or every_candidate or group" 2>/dev/null | grep '::' > /tmp/ids
split -n r/8 /tmp/ids /tmp/shard.
B=$(( $(left) - 5 )); [ $B -gt 110 ] && B=110
[ $B -gt 20 ] && for f in /tmp/shard.*; do (mapfile -t ids < $f; timeout $B python3 -m pytest -q -p no:cacheprovider -rfE "${ids[@]}" > $L/pytest-$(basename $f).log 2>&1) & done; wait
echo "tests t=$SECONDS"; tail -qn 1 $L/pytest-shard.*.log; grep -h -E "^(FAILED|ERROR)" $L/pytest-shard.*.log | cut -c1-300 | head -20
B=$(( $(left) - 3 )); [ $B -gt 55 ] && B=55
[ $B -gt 20 ] && timeout $B python3 bench/nf4_kernels.py --ms 1 --shapes 4096x4096,28672x8192,8192x28672 --group-ms "" --torchao-ms "" --suffix=-v11-m1 --out $OUT > $L/m1.log 2>&1; echo "m1 rc=$? t=$SECONDS"
grep -E "M=1 " $L/m1.log | cut -c1-200
cd $OUT && tar czf logs.tgz logs && rm -rf logs
