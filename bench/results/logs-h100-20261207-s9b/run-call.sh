# Session 9 call 2: ncu of the GEMV and the M = 16 mm on 28672x8192 (shuffle vs shared-memory lookups, cp.async
# stages vs register prefetch, scale after the dot): which pipe or stall bounds them.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
cp .diag/callT.sh $L/run-call.sh; cp .diag/ncu_probe.py $L/
which ncu > $L/env.txt 2>&1; ncu --version >> $L/env.txt 2>&1; nvidia-smi --query-gpu=name --format=csv,noheader >> $L/env.txt; date -u +%FT%TZ >> $L/env.txt; cat $L/env.txt
timeout 60 python3 .diag/ncu_probe.py > $L/probe-plain.log 2>&1; echo "plain rc=$?"; tail -n 3 $L/probe-plain.log
timeout 400 ncu --clock-control none --kernel-name regex:"_nf4_(gemv|mm)_kernel" \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
  --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section InstructionStats \
  --metrics l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,smsp__inst_executed.sum,sm__cycles_elapsed.avg,gpu__time_duration.sum,dram__bytes_read.sum \
  -o $OUT/ncu-s9 -f python3 .diag/ncu_probe.py > $L/ncu.log 2>&1; echo "ncu rc=$?"; tail -n 5 $L/ncu.log
[ -f $OUT/ncu-s9.ncu-rep ] && ncu --import $OUT/ncu-s9.ncu-rep --csv --page details > $OUT/ncu-s9-details.csv 2>$L/ncu-import.err; ls -la $OUT
cd $OUT && tar czf logs.tgz logs && rm -rf logs
