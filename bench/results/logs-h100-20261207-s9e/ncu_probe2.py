"""Session 9: plans for the L1 breakdown (ncu): shipped GEMV, its smem-lookup twin, the scale-load variant 3 with
32x512 tiles (.diag/tl_exp.py), the shipped M = 16 GEMM; 28672x8192, each run twice."""
import os, sys, torch
sys.path.insert(0, os.path.dirname(__file__))
import tl_exp
from nf4compile import format as nf4_format
from nf4compile.ops import triton_linear as tl_

N, K = 28672, 8192
w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
packed, absmax = nf4_format.quantize_nf4(w, 64)
codes, nested, offset = nf4_format.double_quantize(absmax)
del w
G = dict(BLOCK_N=16, BLOCK_K=512, SPLIT_K=1, num_warps=4, num_stages=1, prefetch=True, lookup="shuffle")
x1 = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
x16 = torch.randn(16, K, device="cuda", dtype=torch.bfloat16)
RUNS = [
    ("gemv-shuf-pf", lambda: tl_.nf4_linear(x1, packed, codes, nested, offset, 64, N, K, plan={"path": "gemv", "config": G})),
    ("gemv-smem-pf", lambda: tl_.nf4_linear(x1, packed, codes, nested, offset, 64, N, K, plan={"path": "gemv", "config": {**G, "lookup": "smem"}})),
    ("gemv-v3-32x512w8", lambda: tl_exp.nf4_gemv(x1, packed, codes, nested, offset, 64, N, K, None, dict(G, BLOCK_N=32, num_warps=8, variant=3))),
    ("mm16-shuf", lambda: tl_.nf4_linear(x16, packed, codes, nested, offset, 64, N, K, plan={"path": "mm", "config": dict(BLOCK_M=16, BLOCK_OUT=64, BLOCK_RED=256, SPLIT_K=2, num_warps=4, num_stages=3, lookup="shuffle")})),
]
for name, f in RUNS:
    f(); f()
    torch.cuda.synchronize()
    print(name, flush=True)
