"""Session 16: what bounds the mma gemv (ncu): 28672x8192 at M = 4 on its shipped plan (8 warps, split 4, 2 chunks) and
the same config without split-K, 4096x4096 M = 4 on its plan, and the shipped one-row GEMV at M = 1 for comparison
(each launched twice: compile, then the profiled launch)."""
import torch
from nf4compile import format as nf4_format
from nf4compile.ops import triton_linear as tl_

for N, K, runs in [(28672, 8192, [("mma-28672-m4-split4", 4, {"path": "mma_gemv", "config": {"num_warps": 8, "SPLIT_K": 4, "CHUNKS": 2}}),
                                  ("mma-28672-m4-split1", 4, {"path": "mma_gemv", "config": {"num_warps": 8, "SPLIT_K": 1, "CHUNKS": 2}}),
                                  ("gemv-28672-m1-shipped", 1, None)]),
                   (4096, 4096, [("mma-4096-m4-shipped", 4, None)])]:
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    packed, absmax = nf4_format.quantize_nf4(w, 64)
    codes, nested, offset = nf4_format.double_quantize(absmax)
    del w
    for name, M, plan in runs:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        if plan is None:
            plan = tl_.cached_plan(x, N, K, 64, False)
        for _ in range(2):
            tl_.nf4_linear(x, packed, codes, nested, offset, 64, N, K, plan=plan)
        torch.cuda.synchronize()
        print(name, plan, flush=True)
