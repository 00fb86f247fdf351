# Session 15 call A3 (inline, same warm machine): the four sibling groups tuned at M = 8 as group launches, with the
# mma gemv among the candidates, over call A's merged plans.
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1; mkdir -p $OUT/logs $OUT/groups; cp /tmp/merged-plans-h100.json ops/tuned_configs_h100.json; timeout 105 python3 bench/nf4_kernels.py --tune --shapes "" --ms 8 --group-ms 8 --torchao-ms "" --suffix=-v11-groups-m8 --out $OUT/groups > $OUT/logs/groups-m8.log 2>&1; echo rc=$?; grep -E '^\{"weights' $OUT/logs/groups-m8.log | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); t=sorted(r.get('tuning',[]), key=lambda e: e['us'])
    print(r['weights'], r['M'], 'sep', round(r['us_separate'],1), 'group', round(r['us_group'],1), 'rel', round(r['rel_diff_vs_separate'],5), json.dumps(r['plan'])[:140])
    for e in t[:4]: print('   ', round(e['us'],1), json.dumps(e['plan'])[:140])"
