"""Session 9: the shipped M = 1 plans of the two largest shapes against a float64 reference on the GPU."""
import torch
from nf4compile import format as nf4_format
from nf4compile.ops import triton_linear as tl_
for N, K in [(28672, 8192), (8192, 28672), (11008, 4096)]:
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    packed, absmax = nf4_format.quantize_nf4(w, 64)
    codes, nested, offset = nf4_format.double_quantize(absmax)
    del w
    w64 = torch.ops.nf4compile.dequantize(packed, codes, nested, offset, 64, [N, K], torch.float32).double()
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    plan = tl_.plan_for(x, packed, codes, nested, offset, 64, N, K, None, False)
    out = torch.ops.nf4compile.linear(x, packed, codes, nested, offset, 64, N, K, None)
    ref = x.double() @ w64.T
    err = ((out.double() - ref).norm() / ref.norm()).item()
    print(N, K, plan, f"rel err {err:.2e}", "ok" if err < 1e-2 else "FAIL", flush=True)
    del w64
