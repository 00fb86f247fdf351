"""Session 9: run chosen plans of nf4compile.linear on 28672x8192 twice each (compile, then the profiled launch),
for ncu: python3 .diag/ncu_probe.py; prints the plan order."""
import torch
from nf4compile import format as nf4_format
from nf4compile.ops import triton_linear as tl_

N, K = 28672, 8192
w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
packed, absmax = nf4_format.quantize_nf4(w, 64)
codes, nested, offset = nf4_format.double_quantize(absmax)
del w
G = dict(BLOCK_N=16, BLOCK_K=512, SPLIT_K=1, num_warps=4, num_stages=1, prefetch=True)
M16 = dict(BLOCK_M=16, BLOCK_OUT=64, BLOCK_RED=256, SPLIT_K=2, num_warps=4, num_stages=3)
PLANS = [
    ("gemv-shuffle-prefetch", 1, {"path": "gemv", "config": {**G, "lookup": "shuffle"}}),
    ("gemv-smem-prefetch", 1, {"path": "gemv", "config": G}),
    ("gemv-shuffle-stages3", 1, {"path": "gemv", "config": {**G, "prefetch": False, "num_stages": 3, "lookup": "shuffle"}}),
    ("mm16-shuffle", 16, {"path": "mm", "config": {**M16, "lookup": "shuffle"}}),
    ("mm16-smem", 16, {"path": "mm", "config": M16}),
    ("mm16-after", 16, {"path": "mm", "config": dict(BLOCK_M=16, BLOCK_OUT=128, BLOCK_RED=64, SPLIT_K=4, num_warps=4, num_stages=3, lookup="shuffle", scale="after")}),
]
for name, M, plan in PLANS:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        tl_.nf4_linear(x, packed, codes, nested, offset, 64, N, K, plan=plan)
    torch.cuda.synchronize()
    print(name, flush=True)
