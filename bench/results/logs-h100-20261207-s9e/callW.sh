# Session 9 call 5: which part of the L1/TEX unit bounds the GEMV and the M = 16 GEMM (ncu breakdown of
# l1tex__throughput, global sectors and requests, LSU wavefronts), 28672x8192.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
cp .diag/callW.sh .diag/ncu_probe2.py $L/
(nvidia-smi --query-gpu=name --format=csv,noheader; ncu --version | tail -1; date -u +%FT%TZ) > $L/env.txt 2>&1; cat $L/env.txt
timeout 300 ncu --clock-control none --kernel-name regex:"_nf4_(gemv|mm)_kernel" --launch-skip-before-match 0 \
  --section SpeedOfLight \
  --metrics breakdown:l1tex__throughput.avg.pct_of_peak_sustained_elapsed,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,l1tex__data_pipe_lsu_wavefronts.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,smsp__inst_executed.sum \
  -o $OUT/ncu-s9-l1 -f python3 .diag/ncu_probe2.py > $L/ncu.log 2>&1; echo "ncu rc=$?"; tail -n 8 $L/ncu.log
[ -f $OUT/ncu-s9-l1.ncu-rep ] && ncu --import $OUT/ncu-s9-l1.ncu-rep --csv --page details > $OUT/ncu-s9-l1-details.csv 2>&1; ls -la $OUT
cd $OUT && tar czf logs.tgz logs && rm -rf logs
