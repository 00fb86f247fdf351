# Session 9 call 8: sibling groups tuned as group launches (bench/nf4_kernels.py bench_sibling_groups, every
# prefetching gemv candidate timed as the linear_group call), 4096x4096 M = 1 as the one shape.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L; cp .diag/callZ.sh $L/run-call.sh
(nvidia-smi --query-gpu=name --format=csv,noheader; date -u +%FT%TZ) > $L/env.txt; cat $L/env.txt
timeout ${T:-150} python3 bench/nf4_kernels.py --tune --shapes 4096x4096 --ms 1 --torchao-ms "" --suffix=-v6-groups --out $OUT > $L/kernels.log 2>&1; echo "rc=$?"
grep -E "us_group" $L/kernels.log | python3 -c "
import sys, json
for l in sys.stdin:
    r = json.loads(l); t = sorted(r.get('tuning', []), key=lambda t: t['us'])
    print(r['weights'], 'group', round(r['us_group'], 2), 'separate', round(r['us_separate'], 2), [(round(x['us'], 2), x['plan']['config']) for x in t[:3]])
"
echo "t=$SECONDS"; ls $OUT
cd $OUT && tar czf logs.tgz logs && rm -rf logs
