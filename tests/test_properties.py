"""Property tests (hypothesis) over shapes, block sizes, dtypes, double quantization and memory layouts.

Shapes: primes, K = block size, blocks spanning rows (K % block size != 0), N = 1, anything. Weights:
Gaussian, uniform, outliers, all-zero blocks, constant rows, magnitudes from subnormal to 1e2; stored
contiguous, strided or transposed. Activations: contiguous, strided rows, non-contiguous, transposed,
batched, M = 0.

Properties:
  * quantize -> dequantize: every element within the NF4 bound of its block (derived below);
  * quantize is deterministic, independent of the weight's memory layout and of the chunking;
  * linear(x, W) == x @ dequantize(W).T (and x @ W) within the stated tolerance;
  * CPU (plain PyTorch), Triton and CUDA agree: under TRITON_INTERPRET=1 in a subprocess without a GPU
    (as tests/test_triton_kernels.py does), compiled on a GPU, each kernel path forced in turn.

Profiles (tests/conftest.py): "ci" runs 25 derandomized examples per property on shapes <= 256;
NF4COMPILE_HYPOTHESIS=gpu (bench/gpu_hardening.sh) runs shapes up to 4097 on the GPU.

The bound. With s the block's fp32 absmax, every w / s lies in [-1, 1], so the nearest code c is within
half the largest gap between adjacent codebook values (0.152): |c s - w| <= 0.152 s. With double
quantization the kernels multiply by the reconstructed scale s', so |c s' - w| <= 0.152 s + |s' - s|
(|c| <= 1), and |s' - s| is itself bounded by the 8-bit stage: half the dynamic map's largest gap
plus its 65536-point grid step, times the nested absmax of the scale's group of 256. Slack: the fp32
products round (relative 2**-22) and subnormal arithmetic loses absolute 2**-149 steps.
"""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, note
from hypothesis import strategies as st

from nf4compile import format as nf4_format
from nf4compile import to_nf4
from nf4compile.ops.nf4_ops import resolve_absmax

from helpers import rel_err, run_under_interpreter

GPU_PROFILE = os.environ.get("NF4COMPILE_HYPOTHESIS") == "gpu"
MAX_DIM = 4097 if GPU_PROFILE else 256
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PRIMES = [p for p in range(2, MAX_DIM + 1) if all(p % d for d in range(2, int(p**0.5) + 1))]

HALF_GAP = ((nf4_format.NF4_CODEBOOK[1:] - nf4_format.NF4_CODEBOOK[:-1]).max() / 2).item()
DQ_HALF_GAP = ((nf4_format.DYNAMIC_MAP[1:] - nf4_format.DYNAMIC_MAP[:-1]).max() / 2).item() + 1 / 65535
SUBNORMAL_STEP = 2.0**-149
# Relative Frobenius error against float64: 16-bit outputs round at ~2e-3 (any indexing or scale error
# gives O(1)); fp32 outputs agree to accumulation order.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


# --- strategies ---------------------------------------------------------------------------------


@st.composite
def shapes(draw, block_size: int):
    dim = st.integers(1, MAX_DIM)
    kind = draw(st.sampled_from(["any", "primes", "k_is_block", "blocks_span_rows", "one_row"]))
    if kind == "primes":
        return draw(st.sampled_from(PRIMES)), draw(st.sampled_from(PRIMES))
    if kind == "k_is_block":
        return draw(dim), block_size
    if kind == "blocks_span_rows":
        k = draw(dim)
        return draw(dim), k + 1 if k % block_size == 0 else k
    if kind == "one_row":
        return 1, draw(dim)
    return draw(dim), draw(dim)


def _layout(draw, dense: torch.Tensor, layouts) -> torch.Tensor:
    """The same values as ``dense`` (2-D) stored contiguous, transposed, with strided rows, or non-contiguous."""
    layout = draw(st.sampled_from(layouts))
    note(f"layout={layout}")
    rows, cols = dense.shape
    if layout == "transposed":
        return dense.t().contiguous().t()
    if layout == "row_strided":
        return torch.cat([dense, torch.zeros_like(dense)], dim=1)[:, :cols]
    if layout == "non_contiguous":
        wide = torch.zeros(rows, 2 * cols, dtype=dense.dtype, device=dense.device)
        wide[:, ::2] = dense
        return wide[:, ::2]
    return dense


# Subnormal scales for quantization only: outputs of that size lose their precision in any dtype.
QUANTIZE_MAGNITUDES = [1e-39, 1e-3, 1.0, 100.0]
LINEAR_MAGNITUDES = [1e-3, 1.0, 10.0]  # fp16 outputs of large weights would overflow, as dense ones do


@st.composite
def weights(draw, dtypes=DTYPES, magnitudes=LINEAR_MAGNITUDES):
    """(weight, block_size): a fresh random weight of a drawn shape, distribution, dtype and layout."""
    block_size = draw(st.sampled_from(nf4_format.SUPPORTED_BLOCK_SIZES))
    N, K = draw(shapes(block_size))
    dtype = draw(st.sampled_from(dtypes))
    kind = draw(st.sampled_from(["normal", "uniform", "outliers", "zero_blocks", "constant_rows"]))
    magnitude = draw(st.sampled_from(magnitudes))  # 1e-39 in fp16 is zero: all-zero blocks
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(N, K, generator=gen)
    if kind == "uniform":
        w = torch.rand(N, K, generator=gen) * 2 - 1
    elif kind == "outliers":
        w = torch.where(torch.rand(N, K, generator=gen) < 0.01, w * 50, w)
    elif kind == "zero_blocks":
        flat = w.reshape(-1)
        for start in range(0, flat.numel(), 3 * block_size):
            flat[start : start + block_size] = 0
    elif kind == "constant_rows":
        w = w[:, :1].expand(N, K).clone()
    note(f"weight {N}x{K} {dtype} block={block_size} {kind} x{magnitude}")
    w = (w * magnitude).to(dtype).to(DEVICE)
    return _layout(draw, w, ["contiguous", "transposed", "non_contiguous"]), block_size


@st.composite
def activations(draw, features: int, dtype: torch.dtype, max_rows=40):
    """x [..., features]: M rows (0 included), possibly batched, in one of the layouts."""
    rows = draw(st.integers(0, max_rows))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(rows, features, generator=gen).to(dtype).to(DEVICE)
    x = _layout(draw, x, ["contiguous", "transposed", "row_strided", "non_contiguous"])
    if rows % 2 == 0 and rows and draw(st.booleans()):
        x = x.view(2, rows // 2, features) if x.is_contiguous() else x.reshape(2, rows // 2, features)
    note(f"activations {list(x.shape)} stride={x.stride()}")
    return x


# --- quantization ------------------------------------------------------------------------------


def _block_view(t: torch.Tensor, block_size: int) -> torch.Tensor:
    return nf4_format._blocks(t.reshape(-1), block_size)


@given(w=weights(magnitudes=QUANTIZE_MAGNITUDES), double_quant=st.booleans())
def test_quantize_dequantize_error_is_within_the_nf4_bound(w, double_quant):
    weight, block_size = w
    q = to_nf4(weight, block_size, double_quant)
    exact = weight.double()
    absmax = _block_view(exact.abs(), block_size).amax(dim=1)  # s, exact (fp32 holds any 16-bit value)
    scales = resolve_absmax(q.absmax, q.nested_absmax, q.offset).double()  # s', what dequantize multiplies by
    if double_quant:
        nested = q.nested_absmax.double().repeat_interleave(nf4_format.NESTED_BLOCK_SIZE)[: absmax.numel()]
        scale_bound = DQ_HALF_GAP * nested * (1 + 1e-5) + 4 * SUBNORMAL_STEP
        assert ((scales - absmax).abs() <= scale_bound).all(), "double-quantized scale beyond the 8-bit bound"
    else:
        scale_bound = torch.zeros_like(absmax)
        assert torch.equal(scales, absmax)
    bound = (HALF_GAP * absmax + scale_bound) * (1 + 2**-20) + 2**-22 * (absmax + scale_bound) + 4 * SUBNORMAL_STEP
    error = _block_view((q.dequantize(torch.float64) - exact).abs(), block_size)
    worst = (error - bound[:, None]).max().item()
    assert worst <= 0, f"error beyond the NF4 bound by {worst:.3g}"


@given(w=weights(magnitudes=QUANTIZE_MAGNITUDES), double_quant=st.booleans(), pieces=st.integers(2, 8))
def test_quantize_is_deterministic_and_independent_of_layout_and_chunking(w, double_quant, pieces):
    weight, block_size = w
    chunk = block_size * -(-nf4_format.num_blocks(weight.numel(), block_size) // pieces)  # whole blocks
    first, again = to_nf4(weight, block_size, double_quant), to_nf4(weight, block_size, double_quant)
    contiguous = to_nf4(weight.contiguous(), block_size, double_quant)
    with mock.patch.object(nf4_format, "QUANTIZE_CHUNK", chunk):
        chunked = to_nf4(weight, block_size, double_quant)
    for other in (again, contiguous, chunked):
        for name in first.__tensor_flatten__()[0]:
            assert torch.equal(getattr(first, name), getattr(other, name)), name
    if CUDA:  # the CUDA result is the CPU result (the double-quant offset is a mean: last bit may differ)
        on_cpu = to_nf4(weight.cpu(), block_size, double_quant)
        assert torch.equal(on_cpu.packed, first.packed.cpu())
        if not double_quant:
            assert torch.equal(on_cpu.absmax, first.absmax.cpu())


# --- linear --------------------------------------------------------------------------------------


@given(
    w=weights(),
    double_quant=st.booleans(),
    compute_dtype=st.sampled_from(DTYPES),
    form=st.sampled_from(["linear", "linear_bias", "x_at_w"]),
    data=st.data(),
)
def test_linear_is_x_times_the_dequantized_weight(w, double_quant, compute_dtype, form, data):
    """F.linear(x, W) == x @ dequantize(W).T, and x @ W (the backward's form), on DEVICE; on a GPU the
    CPU result agrees too. The weight computes in ``compute_dtype`` (``.to(dtype)`` keeps the codes)."""
    weight, block_size = w
    q = to_nf4(weight, block_size, double_quant).to(compute_dtype)
    N, K = q.shape
    w64 = q.dequantize().double()  # in the compute dtype, as the op dequantizes
    x = data.draw(activations(N if form == "x_at_w" else K, compute_dtype))
    bias = torch.randn(N, device=DEVICE).to(compute_dtype) if form == "linear_bias" else None
    if form == "x_at_w":
        out, ref = x @ q, x.double() @ w64
    else:
        out = F.linear(x, q, bias)
        ref = F.linear(x.double(), w64, None if bias is None else bias.double())
    assert out.shape == ref.shape and out.dtype == compute_dtype and out.device == x.device
    assert rel_err(out, ref) < TOLERANCE[compute_dtype]
    if CUDA:
        on_cpu = (x.cpu() @ q.cpu()) if form == "x_at_w" else F.linear(x.cpu(), q.cpu(), None if bias is None else bias.cpu())
        assert rel_err(out.cpu(), on_cpu.double()) < 2 * TOLERANCE[compute_dtype]


# --- Triton kernels against the CPU path ----------------------------------------------------------

# Small tiles under the interpreter (it runs one program at a time); the shipped configs on a GPU.
if not INTERPRETED:
    from nf4compile.ops import triton_linear

    GEMV_CONFIGS, MM_CONFIGS = triton_linear.GEMV_CONFIGS, triton_linear.MM_CONFIGS
else:
    GEMV_CONFIGS = [dict(BLOCK_N=32, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=2),
                    dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=2, num_warps=4, num_stages=2)]
    MM_CONFIGS = [dict(BLOCK_M=16, BLOCK_OUT=64, BLOCK_RED=64, SPLIT_K=1, num_warps=4, num_stages=2),
                  dict(BLOCK_M=32, BLOCK_OUT=32, BLOCK_RED=128, SPLIT_K=2, num_warps=4, num_stages=2)]


@st.composite
def plans(draw):
    path = draw(st.sampled_from(["dispatch", "gemv", "mm", "dequant"]))
    if path == "dispatch":
        return None
    if path == "dequant":
        return {"path": "dequant"}
    return {"path": path, "config": draw(st.sampled_from(GEMV_CONFIGS if path == "gemv" else MM_CONFIGS))}


def test_triton_properties_under_interpreter():
    if CUDA or INTERPRETED:
        pytest.skip("the kernels run in this process")
    run_under_interpreter(__file__, "-k", "triton_kernels_agree")


@pytest.mark.skipif(not (CUDA or INTERPRETED), reason="runs in test_triton_properties_under_interpreter")
@given(
    w=weights(dtypes=[torch.float32]),
    double_quant=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    plan=plans(),
    x_at_w=st.booleans(),
    bias=st.booleans(),
    data=st.data(),
)
def test_triton_kernels_agree_with_the_cpu_path(w, double_quant, dtype, plan, x_at_w, bias, data):
    """Each path (gemv, mm, dequantize + matmul, or the dispatcher's choice) against the plain-PyTorch
    op on CPU tensors and a float64 reference. A forced path that cannot serve the call (gemv for
    x @ W or M > 4, mm for fp32, blocks spanning rows, too many rows for int32 offsets) falls back to
    the dequantize path: the answer must be right either way. The dequantize kernel is bit-exact."""
    from nf4compile.ops import triton_dequantize, triton_linear

    weight, block_size = w
    q = to_nf4(weight.contiguous(), block_size, double_quant)
    N, K = q.shape
    args = (q.packed, q.absmax, q.nested_absmax, q.offset, block_size)
    dense = triton_dequantize.nf4_dequantize(*args, [N, K], torch.float32)
    cpu_args = [None if t is None else t.cpu() for t in args[:4]]
    assert torch.equal(dense.cpu(), nf4_format.dequantize_nf4(
        cpu_args[0], resolve_absmax(*cpu_args[1:]), block_size, (N, K), torch.float32))
    max_rows = 6 if plan is not None and plan["path"] == "gemv" else 40
    x = data.draw(activations(N if x_at_w else K, dtype, max_rows))
    b = torch.randn(K if x_at_w else N, device=DEVICE).to(dtype) if bias else None
    out = triton_linear.nf4_linear(x, *args, N, K, b, x_at_w, plan=plan)
    on_cpu = torch.ops.nf4compile.linear(x.cpu(), *cpu_args, block_size, N, K, None if b is None else b.cpu(), x_at_w)
    w64 = dense.cpu().double()
    ref = x.cpu().double() @ (w64 if x_at_w else w64.T) + (0 if b is None else b.cpu().double())
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out.cpu(), ref) < TOLERANCE[dtype]
    assert rel_err(on_cpu, ref) < TOLERANCE[dtype]
