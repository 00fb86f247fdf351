"""Session 12: the pairs plans against the same tiles by shuffles, 28672x8192, for ncu (each plan run twice: compile,
then the profiled launch): the M = 1 GEMV (shipped pairs plan) and the M = 16 GEMM (shipped pairs plan)."""
import torch
from nf4compile import format as nf4_format
from nf4compile.ops import triton_linear as tl_

N, K = 28672, 8192
w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
packed, absmax = nf4_format.quantize_nf4(w, 64)
codes, nested, offset = nf4_format.double_quantize(absmax)
del w
G = dict(BLOCK_N=32, BLOCK_K=512, SPLIT_K=1, num_warps=8, num_stages=1, prefetch=True, scales="rows")
M16 = dict(BLOCK_M=16, BLOCK_OUT=64, BLOCK_RED=256, SPLIT_K=2, num_warps=4, num_stages=3)
PLANS = [
    ("gemv-pairs", 1, {"path": "gemv", "config": {**G, "lookup": "pairs"}}),
    ("gemv-shuffle", 1, {"path": "gemv", "config": {**G, "lookup": "shuffle"}}),
    ("mm16-pairs", 16, {"path": "mm", "config": {**M16, "lookup": "pairs"}}),
    ("mm16-shuffle", 16, {"path": "mm", "config": {**M16, "lookup": "shuffle"}}),
]
for name, M, plan in PLANS:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        tl_.nf4_linear(x, packed, codes, nested, offset, 64, N, K, plan=plan)
    torch.cuda.synchronize()
    print(name, flush=True)
