# Session 9 call 7: the shipped plans after the merge: the M = 1 plans ("scales": "rows") of the three shapes
# that took them, against a float64 reference.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L; cp .diag/callY.sh .diag/check_shipped.py $L/
(nvidia-smi --query-gpu=name --format=csv,noheader; date -u +%FT%TZ) > $L/env.txt; cat $L/env.txt
timeout 60 python3 .diag/check_shipped.py > $L/check-shipped.log 2>&1; echo "check rc=$?"; grep -v Warn $L/check-shipped.log | tail -4
cd $OUT && tar czf logs.tgz logs && rm -rf logs
