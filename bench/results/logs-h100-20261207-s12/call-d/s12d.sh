# Session 12 call D: GPU numerics of the pairs plans after the launch change (a pairs GEMM launched as compiled after
# its shared-memory opt-in), its host cost, and ncu of the pairs GEMV and GEMM against shuffles (28672x8192).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L; cp .diag/s12d.sh .diag/ncu_probe3.py $L/
(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; ncu --version | tail -1; python3 -c "import torch,triton;print('torch',torch.__version__,'triton',triton.__version__)"; date -u +%FT%TZ) > $L/env.txt 2>&1
cat $L/env.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py -k "pairs or 48_kb" > $L/cuda-tests-pairs.log 2>&1; echo "tests rc=$?"; grep -E "passed|failed|FAILED|Error" $L/cuda-tests-pairs.log | head -8
echo "t=$SECONDS"
timeout 40 python3 .diag/host_pairs.py > $L/host.log 2>&1; tail -1 $L/host.log
echo "t=$SECONDS"
timeout 200 ncu --clock-control none --kernel-name regex:"_nf4_(gemv|mm)_kernel" --launch-skip-before-match 0 \
  --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
  --metrics breakdown:l1tex__throughput.avg.pct_of_peak_sustained_elapsed,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,l1tex__data_pipe_lsu_wavefronts.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,smsp__inst_executed.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum \
  -o $OUT/ncu-s12 -f python3 .diag/ncu_probe3.py > $L/ncu.log 2>&1; echo "ncu rc=$?"; tail -n 4 $L/ncu.log
[ -f $OUT/ncu-s12.ncu-rep ] && ncu --import $OUT/ncu-s12.ncu-rep --csv --page details > $OUT/ncu-s12-details.csv 2>&1
echo "t=$SECONDS"
cd $OUT && tar czf logs.tgz logs && rm -rf logs
