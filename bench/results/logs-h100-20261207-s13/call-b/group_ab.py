"""Sibling groups at a few rows of activations (session 13): one nf4compile.linear_group launch (the mm kernel over 2-3
weights) against one nf4compile.linear per weight, CUDA-graph times over weight copies worth 3x L2, with the plans the
dispatcher picks (shipped; a group's rows borrow the nearest tuned width's plan at their M bucket). And the numerics."""
import json, math, os, sys, time
import torch
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from nf4_kernels import NF4Weight, BLOCK
from nf4compile.ops import triton_linear as tlin

l2 = torch.cuda.get_device_properties(0).L2_cache_size
res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%FT%TZ", time.gmtime()), "rows": []}
groups = [((4096, 4096, 4096), 4096), ((11008, 11008), 4096), ((4096, 1024, 1024), 4096)]
for sizes, K in groups:
    torch.manual_seed(0)
    weights = [NF4Weight(torch.randn(n, K, device="cuda", dtype=torch.bfloat16)) for n in sizes]
    copies = max(2, math.ceil(3 * l2 / sum(w.nbytes() for w in weights)))
    sets = [[w.copy() for w in weights] for _ in range(copies)]
    for M in (4, 8, 16):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        def group_call(ws):
            lists = [list(parts) for parts in zip(*(w.args for w in ws))]
            return lambda: tlin.nf4_linear_group(x, *lists, BLOCK, list(sizes), K, [None] * len(ws))
        separate = torch.cat([w.fused(x) for w in weights], dim=-1).double()
        grouped = group_call(weights)().double()
        row = {"weights": " + ".join(f"{n}x{K}" for n in sizes), "M": M,
               "plan_group": tlin.cached_plan(x, sum(sizes), K, BLOCK, False),
               "rel_diff_vs_separate": float((grouped - separate).norm() / separate.norm())}
        row["us_separate"] = min(tlin.cuda_graph_us([lambda ws=ws: [w.fused(x) for w in ws] for ws in sets]) for _ in range(2))
        row["us_group"] = min(tlin.cuda_graph_us([group_call(ws) for ws in sets]) for _ in range(2))
        row["speedup"] = row["us_separate"] / row["us_group"]
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "plan_group"}), flush=True)
        res["rows"].append(row)
    del sets
    json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "group-ab.json"), "w"), indent=1)
