# Session 16 call A (every fused kernel failed to compile here: the _sibling_weight bug; bf16 compiled ran) (its mma_ab.py and ncu_mma.py: call-a2/, the same files): Llama-2-7B batch 8 end to end with the shipped plans (the four groups' mma plans merged last
# session, never run end to end); the mma gemv's second tile of rows (M = 9-16) checked against fp64 and timed on the
# seven shapes, 14336x4096 and 4096x14336 at M = 4 and 8 (never timed with the mma); ncu of the mma gemv; the GPU
# kernel tests of the mma gemv; its loads two steps ahead (DEPTH 2) and split-K counts that fill the last wave.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L; cp .diag/s16a.sh $L/run-call.sh; cp .diag/mma_ab.py .diag/ncu_mma.py $L/
LIMIT=${LIMIT:-580}
left() { echo $(( LIMIT - SECONDS )); }
(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; ncu --version | tail -1; python3 -c "import torch,triton,transformers;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__)"; date -u +%FT%TZ) > $L/env.txt 2>&1
cat $L/env.txt
CHIP=h100; case "$(head -1 $L/env.txt)" in *H200*) CHIP=h200; cp ops/tuned_configs_h100.json ops/tuned_configs_h200.json;; esac
B=$(( $(left) - 390 )); [ $B -gt 185 ] && B=185
[ $B -gt 20 ] && timeout $B python3 bench/e2e.py --models llama-2-7b --batches 8 --methods nf4compile,bf16-compiled --gpu-budget-s $((B-10)) --out $OUT > $L/e2e-b8.log 2>&1; echo "e2e rc=$? t=$SECONDS"
grep -E "^\{|target" $L/e2e-b8.log | cut -c1-400
B=$(( $(left) - 300 )); [ $B -gt 90 ] && B=90
[ $B -gt 20 ] && WIDE=1 timeout $B python3 .diag/mma_ab.py $OUT/wide 28672x8192,4096x4096,11008x4096 4 > $L/wide.log 2>&1; echo "wide rc=$? t=$SECONDS"
grep -v -E "Warn|Failed to load|KernelPref" $L/wide.log | cut -c1-250
B=$(( $(left) - 185 )); [ $B -gt 75 ] && B=75
[ $B -gt 20 ] && timeout $B python3 .diag/mma_ab.py $OUT/mma16 4096x4096,11008x4096,4096x11008,28672x8192,8192x28672 16 > $L/mma16.log 2>&1; echo "mma16 rc=$? t=$SECONDS"
grep -E "^[0-9]+x" $L/mma16.log | cut -c1-250
B=$(( $(left) - 100 )); [ $B -gt 85 ] && B=85
[ $B -gt 20 ] && timeout $B python3 .diag/mma_ab.py $OUT/mma14 14336x4096,4096x14336 4,8,16 > $L/mma14.log 2>&1; echo "mma14 rc=$? t=$SECONDS"
grep -E "^[0-9]+x" $L/mma14.log | cut -c1-250
B=$(( $(left) - 50 )); [ $B -gt 50 ] && B=50
[ $B -gt 20 ] && timeout $B ncu --clock-control none --kernel-name regex:"_nf4_(gemv|mma_gemv)_kernel" --launch-skip-before-match 0 \
  --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats --section MemoryWorkloadAnalysis \
  --metrics smsp__inst_executed.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,lts__t_sectors_srcunit_tex_op_read.sum \
  -o $OUT/ncu-s16 -f python3 .diag/ncu_mma.py > $L/ncu.log 2>&1; echo "ncu rc=$? t=$SECONDS"; tail -n 5 $L/ncu.log
[ -f $OUT/ncu-s16.ncu-rep ] && ncu --import $OUT/ncu-s16.ncu-rep --csv --page details > $OUT/ncu-s16-details.csv 2>&1 && rm $OUT/ncu-s16.ncu-rep
python3 -m pytest -q --collect-only -p no:cacheprovider tests/test_triton_kernels.py -k "mma" 2>/dev/null | grep '::' > /tmp/ids
split -n r/8 /tmp/ids /tmp/shard.
B=$(( $(left) - 5 )); [ $B -gt 45 ] && B=45
[ $B -gt 20 ] && for f in /tmp/shard.*; do (mapfile -t ids < $f; timeout $B python3 -m pytest -q -p no:cacheprovider -rfE "${ids[@]}" > $L/pytest-$(basename $f).log 2>&1) & done; wait
echo "tests t=$SECONDS"; tail -qn 1 $L/pytest-shard.*.log; grep -h -E "^(FAILED|ERROR)" $L/pytest-shard.*.log | cut -c1-300 | head -20
cd $OUT && ls -la . wide mma14 mma16; tar czf all.tgz --exclude all.tgz . ; ls | grep -v all.tgz | xargs rm -rf; ls -la
