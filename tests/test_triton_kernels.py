"""The Triton kernels of ops/triton_dequantize.py and ops/triton_linear.py against float64 references.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1, on small and odd shapes. The
variable must be set before Triton is imported (its own @jit helpers, tl.interleave among them, are
decorated at import) and conftest.py imports the package first, so `test_under_interpreter` runs
this file again in a subprocess with the variable set; in the parent process the other tests skip.
The interpreter computes bf16 wrongly, so the kernels do their arithmetic in fp32 there (the mm
kernel's tl.dot included); it truncates fp32 -> bf16/fp16 casts, so dequantized values may be one
ulp below the reference. On a GPU the same tests run compiled, with exact dequantization, plus the
`cuda`-marked tests on Llama shapes through the registered ops.

Tolerances: dequantize is bit-exact (fp32 always; fp16/bf16 on a GPU), one ulp under the interpreter.
The fused linear paths must land within a relative Frobenius error of 1e-2 of x64 @ W64 (bf16
output rounding alone gives ~2e-3; any indexing or scale error gives O(1)); fp32 gemv within 1e-5.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")

from nf4compile import format as nf4_format  # noqa: E402
from nf4compile.ops import triton_dequantize, triton_linear  # noqa: E402

from helpers import rel_err, run_under_interpreter  # noqa: E402

CUDA = torch.cuda.is_available()
INTERPRETED = triton_linear.INTERPRET
DEVICE = "cuda" if CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _kernels_run_here(request):
    if not (CUDA or INTERPRETED) and request.node.originalname != "test_under_interpreter":
        pytest.skip("runs in test_under_interpreter's TRITON_INTERPRET=1 subprocess")


def test_under_interpreter():
    if CUDA or INTERPRETED:
        pytest.skip("the kernels run in this process")
    run_under_interpreter(__file__)


def make_weight(N, K, block_size, double_quant, device=DEVICE):
    """Fresh random NF4 weight -> (packed, absmax, nested, offset) and its float64 dequantization."""
    w = torch.randn(N, K, device=device) * torch.rand(N, 1, device=device)  # scales vary per row
    packed, absmax = nf4_format.quantize_nf4(w, block_size)
    nested = offset = None
    if double_quant:
        absmax, nested, offset = nf4_format.double_quantize(absmax)
    scales = absmax if nested is None else nf4_format.dequantize_absmax(absmax, nested, offset)
    w64 = nf4_format.dequantize_nf4(packed, scales, block_size, (N, K), torch.float64)
    return (packed, absmax, nested, offset), w64


# dequantize -------------------------------------------------------------------------------------

# (N, K, block_size): K = block, blocks spanning rows, odd element counts, a partial last block.
DEQUANT_SHAPES = [(8, 64, 64), (37, 96, 32), (33, 33, 64), (5, 200, 128), (3, 1000, 256), (1, 7, 32)]


@pytest.mark.parametrize("N,K,block_size", DEQUANT_SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_matches_reference(N, K, block_size, double_quant, dtype):
    (packed, absmax, nested, offset), w64 = make_weight(N, K, block_size, double_quant)
    out = triton_dequantize.nf4_dequantize(packed, absmax, nested, offset, block_size, [N, K], dtype)
    # The reference rounds the fp32 product once, as the kernel must.
    ref = w64.float().to(dtype)
    assert out.shape == (N, K) and out.dtype == dtype
    if dtype == torch.float32 or CUDA:
        assert torch.equal(out, ref)
    else:  # the interpreter truncates fp32 -> 16-bit: at most one ulp towards zero
        ulp = torch.finfo(dtype).eps * ref.float().abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((out.float() - ref.float()).abs() <= ulp).all()


def test_dequantize_empty():
    packed = torch.empty(0, dtype=torch.uint8, device=DEVICE)
    absmax = torch.empty(0, device=DEVICE)
    out = triton_dequantize.nf4_dequantize(packed, absmax, None, None, 64, [0, 64], torch.bfloat16)
    assert out.shape == (0, 64)


# linear, one path at a time ---------------------------------------------------------------------

# Small tiles so that the odd shapes below take several steps, partial tiles and masked groups.
GEMV = {"path": "gemv", "config": dict(BLOCK_N=8, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=2)}
GEMV_SPLIT = {"path": "gemv", "config": dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=2, num_warps=4, num_stages=2)}
GEMV_SHUFFLE = {"path": "gemv", "config": {**GEMV["config"], "lookup": "shuffle"}}
GEMV_PREFETCH = {"path": "gemv", "config": {**GEMV["config"], "num_stages": 1, "prefetch": True}}
GEMV_PREFETCH_SPLIT = {"path": "gemv", "config": {**GEMV_SPLIT["config"], "num_stages": 1, "prefetch": True}}
GEMV_MIXED = {"path": "gemv", "config": {**GEMV_PREFETCH["config"], "lookup": "mixed"}}
GEMV_ROW_SCALES = {"path": "gemv", "config": {**GEMV_PREFETCH["config"], "scales": "rows"}}
GEMV_ROW_SCALES_SPLIT = {"path": "gemv", "config": {**GEMV_PREFETCH_SPLIT["config"], "lookup": "shuffle", "scales": "rows"}}
GEMV_PAIRS = {"path": "gemv", "config": {**GEMV_PREFETCH["config"], "lookup": "pairs"}}
GEMV_PAIRS_SPLIT = {"path": "gemv", "config": {**GEMV_SPLIT["config"], "lookup": "pairs", "scales": "rows", "maxnreg": 64}}
MM = {"path": "mm", "config": dict(BLOCK_M=16, BLOCK_OUT=32, BLOCK_RED=64, SPLIT_K=1, num_warps=4, num_stages=2)}
MM_SPLIT = {"path": "mm", "config": dict(BLOCK_M=16, BLOCK_OUT=16, BLOCK_RED=32, SPLIT_K=3, num_warps=4, num_stages=2)}
MM_WIDE = {"path": "mm", "config": dict(BLOCK_M=32, BLOCK_OUT=64, BLOCK_RED=128, SPLIT_K=1, num_warps=4, num_stages=2)}
MM_SHUFFLE = {"path": "mm", "config": {**MM_SPLIT["config"], "lookup": "shuffle"}}
# Scale after the dot: two groups a step where block_size is 32, a group shorter than a block where
# it is 64 (MM_AFTER_SPLIT); x @ W runs the scale-before kernel.
MM_AFTER = {"path": "mm", "config": {**MM["config"], "scale": "after"}}
MM_AFTER_SPLIT = {"path": "mm", "config": {**MM_SPLIT["config"], "lookup": "shuffle", "scale": "after"}}
MM_PAIRS = {"path": "mm", "config": {**MM_SPLIT["config"], "lookup": "pairs"}}
MM_AFTER_PAIRS = {"path": "mm", "config": {**MM["config"], "lookup": "pairs", "scale": "after"}}
DEQUANT = {"path": "dequant"}

# (N, K, block_size, double_quant): N and K not powers of two, K = block size, K < a tile, and
# (32, 256) where the tiles divide the weight (the kernels drop their masks there: EVEN).
LINEAR_CASES = [
    (40, 192, 64, True),
    (37, 96, 32, False),
    (24, 64, 64, True),
    (19, 320, 64, False),
    (32, 256, 64, True),
]


def _check_linear(plan, N, K, block_size, double_quant, M, dtype, bias, x_at_w=False, x_shape=None):
    (packed, absmax, nested, offset), w64 = make_weight(N, K, block_size, double_quant)
    red, out_dim = (N, K) if x_at_w else (K, N)
    x = torch.randn(*(x_shape or (M,)), red, device=DEVICE).to(dtype)
    b = torch.randn(out_dim, device=DEVICE, dtype=dtype) if bias else None
    out = triton_linear.nf4_linear(x, packed, absmax, nested, offset, block_size, N, K, b, x_at_w, plan=plan)
    ref = x.double() @ (w64 if x_at_w else w64.T)
    if bias:
        ref = ref + b.double()
    assert out.shape == ref.shape and out.dtype == dtype
    limit = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out, ref) < limit


# The shuffle and mixed plans decode by warp shuffles on a GPU and by the shared-memory lookup in the
# interpreter (no PTX there): under the interpreter they check the plumbing, on a GPU the shuffles. The
# pairs plans read the fp16 pair table by a gather in the interpreter, from a PTX-staged copy on a GPU.
@pytest.mark.parametrize(
    "plan", [GEMV, GEMV_SPLIT, GEMV_SHUFFLE, GEMV_PREFETCH, GEMV_PREFETCH_SPLIT, GEMV_MIXED, GEMV_ROW_SCALES,
             GEMV_ROW_SCALES_SPLIT, GEMV_PAIRS, GEMV_PAIRS_SPLIT],
    ids=["gemv", "gemv-splitk", "gemv-shuffle", "gemv-prefetch", "gemv-prefetch-splitk", "gemv-mixed", "gemv-row-scales",
         "gemv-row-scales-splitk", "gemv-pairs", "gemv-pairs-splitk"],
)
@pytest.mark.parametrize("N,K,block_size,double_quant", LINEAR_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_gemv(plan, N, K, block_size, double_quant, bias):
    _check_linear(plan, N, K, block_size, double_quant, 1, torch.bfloat16, bias=bias)


# Several rows of activations, each step decoded once for all: 2 rows, 3 (a fourth row re-reads the third and
# is not stored) and 8, on an odd shape and one every tile divides (EVEN), split-K's atomics included.
@pytest.mark.parametrize(
    "plan", [GEMV, GEMV_PREFETCH, GEMV_PAIRS, GEMV_ROW_SCALES_SPLIT], ids=["gemv", "gemv-prefetch", "gemv-pairs", "gemv-row-scales-splitk"]
)
@pytest.mark.parametrize("N,K,block_size,double_quant", [LINEAR_CASES[0], LINEAR_CASES[-1]])
@pytest.mark.parametrize("M", [2, 3, 8])
def test_gemv_rows(plan, N, K, block_size, double_quant, M):
    _check_linear(plan, N, K, block_size, double_quant, M, torch.bfloat16, bias=True)


def test_gemv_plan_forced_on_more_rows_than_it_serves_takes_dequantize():
    # kernel_can_serve turns the forced plan down: the dequantize path computes it.
    _check_linear(GEMV_PAIRS, 40, 192, 64, True, triton_linear.GEMV_MAX_M + 1, torch.bfloat16, bias=True)


def test_gemv_rows_of_a_strided_input_and_fp32():
    (packed, absmax, nested, offset), w64 = make_weight(40, 192, 64, True)
    x = torch.randn(5, 384, device=DEVICE).to(torch.bfloat16)[:, ::2]  # rows 384 apart, copied to contiguous rows
    out = triton_linear.nf4_linear(x, packed, absmax, nested, offset, 64, 40, 192, plan=GEMV_PREFETCH)
    assert rel_err(out, x.double() @ w64.T) < 1e-2
    x = torch.randn(3, 400, device=DEVICE)[:, 8:200]  # rows 400 apart, read in place
    out = triton_linear.nf4_linear(x, packed, absmax, nested, offset, 64, 40, 192, plan=GEMV_PAIRS)
    assert out.dtype == torch.float32 and rel_err(out, x.double() @ w64.T) < 1e-5


@pytest.mark.parametrize("plan", [GEMV_PREFETCH, GEMV_ROW_SCALES], ids=["gemv-prefetch", "gemv-row-scales"])
def test_gemv_weights_of_several_nested_blocks(plan):
    # 1536 quantization blocks, 6 nested blocks of 256: the row-scales plan reads one nested absmax per row
    # and step (rows 0-31 in the first, 32-63 in the second, ...).
    _check_linear(plan, 192, 512, 64, True, 1, torch.bfloat16, bias=False)


def test_gemv_activations_at_an_unaligned_address():
    # A view two bytes into its buffer: Triton compiles the kernel without its 16-byte alignment hints.
    (packed, absmax, nested, offset), w64 = make_weight(32, 256, 64, True)
    x = torch.randn(257, device=DEVICE).to(torch.bfloat16)[1:].view(1, 256)
    assert x.data_ptr() % 16 != 0
    out = triton_linear.nf4_linear(x, packed, absmax, nested, offset, 64, 32, 256, plan=GEMV_PREFETCH)
    assert rel_err(out, x.double() @ w64.T) < 1e-2


# The tensor-core gemv: 4 warps (64 weight rows a program), one chunk of 64 columns a step, and split-K's atomics
# with 3 slices and two chunks a step (slices of one chunk, or empty ones, where K has 2 or 3 chunks: steps past
# their slice). In the interpreter its mma runs emulated from the lanes' fragments as the PTX ISA
# lays them out (_emulated_mma), on a GPU as PTX: both check how the kernel fills the fragments.
MMA_GEMV = {"path": "mma_gemv", "config": dict(num_warps=4, SPLIT_K=1, CHUNKS=1)}
MMA_GEMV_SPLIT = {"path": "mma_gemv", "config": dict(num_warps=4, SPLIT_K=3, CHUNKS=2)}
# Scales resolved one chunk a lane of each quad and shuffled (four chunks an iteration; slices of 1-3 chunks here).
MMA_GEMV_QUAD = {"path": "mma_gemv", "config": dict(num_warps=4, SPLIT_K=2, CHUNKS=1, scales="quad")}
# Block sizes that are multiples of the kernel's 64-column chunk; rows not multiples of 16 or 64; (64, 128, 64)
# where the tiles divide W.
MMA_CASES = [(40, 192, 64, True), (19, 320, 64, False), (72, 256, 128, True), (64, 128, 64, True)]


@pytest.mark.parametrize("plan", [MMA_GEMV, MMA_GEMV_SPLIT, MMA_GEMV_QUAD], ids=["mma-gemv", "mma-gemv-splitk", "mma-gemv-quad"])
@pytest.mark.parametrize("N,K,block_size,double_quant", MMA_CASES)
@pytest.mark.parametrize("M", [1, 3, 8, 13, 16])  # 13 and 16: a second tile of 8 activation rows
def test_mma_gemv(plan, N, K, block_size, double_quant, M):
    _check_linear(plan, N, K, block_size, double_quant, M, torch.bfloat16, bias=True)


# Two tiles of 16 weight rows a warp (128 rows a program of 4 warps), sharing the activations' fragments: 300 rows
# take three programs, the last one part full; with per-chunk and quad scales.
MMA_GEMV_TWO_TILES = {"path": "mma_gemv", "config": dict(num_warps=4, SPLIT_K=2, CHUNKS=2, WEIGHT_TILES=2)}
MMA_GEMV_TWO_TILES_QUAD = {"path": "mma_gemv", "config": dict(num_warps=4, SPLIT_K=3, CHUNKS=1, scales="quad",
                                                              WEIGHT_TILES=2)}


@pytest.mark.parametrize("plan", [MMA_GEMV_TWO_TILES, MMA_GEMV_TWO_TILES_QUAD], ids=["two-tiles", "two-tiles-quad"])
@pytest.mark.parametrize("N,K,block_size,double_quant", [(300, 192, 64, True), (19, 320, 64, False), (72, 256, 128, True)])
@pytest.mark.parametrize("M", [1, 8, 13])
def test_mma_gemv_two_weight_tiles(plan, N, K, block_size, double_quant, M):
    _check_linear(plan, N, K, block_size, double_quant, M, torch.bfloat16, bias=True)


def test_mma_gemv_fp16_and_batch_dims():
    _check_linear(MMA_GEMV_SPLIT, 40, 192, 64, True, None, torch.float16, bias=True, x_shape=(2, 3))


@pytest.mark.parametrize(
    "what", ["block 32", "fp32", "17 rows", "x unaligned", "x row stride", "codes unaligned"],
)
def test_mma_gemv_forced_where_it_cannot_read_takes_dequantize(what, monkeypatch):
    """What the mma gemv cannot read (a 64-column chunk across two blocks, fp32, more rows than two mma tiles,
    activations not 16-byte aligned, codes not 8-byte aligned): kernel_can_serve or the alignment check turns the
    forced plan down, and the dequantize path computes the call (the kernel itself would fail)."""
    N, K, block_size = 40, 192, (32 if what == "block 32" else 64)
    (packed, absmax, nested, offset), w64 = make_weight(N, K, block_size, True)
    dtype = torch.float32 if what == "fp32" else torch.bfloat16
    x = torch.randn(17 if what == "17 rows" else 3, K, device=DEVICE).to(dtype)
    if what == "x unaligned":
        x = torch.randn(3 * K + 1, device=DEVICE).to(dtype)[1:].view(3, K)
    if what == "x row stride":
        x = torch.randn(3, K + 4, device=DEVICE).to(dtype)[:, :K]
    if what == "codes unaligned":
        shifted = torch.empty(packed.numel() + 4, dtype=torch.uint8, device=DEVICE)
        shifted[4:] = packed
        packed = shifted[4:]
        assert packed.data_ptr() % 8 == 4
    monkeypatch.setattr(triton_linear, "_nf4_mma_gemv_kernel", None)
    out = triton_linear.nf4_linear(x, packed, absmax, nested, offset, block_size, N, K, plan=MMA_GEMV)
    assert rel_err(out, x.double() @ w64.T) < (1e-5 if dtype == torch.float32 else 1e-2)


# fp32 within 1e-5 of float64: a pairs plan (fp16 pair table) decodes fp32 activations by shuffles.
@pytest.mark.parametrize("plan", [GEMV, GEMV_PAIRS], ids=["gemv", "gemv-pairs"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gemv_dtypes(plan, dtype):
    _check_linear(plan, 40, 192, 64, True, 1, dtype, bias=True)


# Sibling groups: (rows of each weight, K, block_size, double_quant); rows not multiples of the tile
# and one of a single row, and (32, 32, 64) x 256 where every tile divides (EVEN).
GROUP_CASES = [((40, 24, 8), 192, 64, True), ((37, 1), 96, 32, False), ((32, 32, 64), 256, 64, True)]


def _group(rows, K, block_size, double_quant, dtype, bias):
    made = [make_weight(n, K, block_size, double_quant) for n in rows]
    nf4 = [list(parts) for parts in zip(*(m[0] for m in made))]  # packed, absmax, nested, offset: one list each
    biases = [torch.randn(n, device=DEVICE, dtype=dtype) if bias else None for n in rows]
    ref_weight = torch.cat([m[1] for m in made])
    ref_bias = torch.cat([b.double() for b in biases]) if bias else 0
    return nf4, biases, ref_weight, ref_bias


# One row or a few (a decode batch): the gemv or the mm, whose output tiles run over the weights in turn.
@pytest.mark.parametrize(
    "plan,M",
    [(GEMV, 1), (GEMV_SPLIT, 1), (GEMV_PREFETCH, 1), (GEMV_MIXED, 1), (GEMV_ROW_SCALES, 1), (GEMV_PAIRS, 1),
     (GEMV_PAIRS, 3), (MM, 5), (MM_SPLIT, 5), (MM_SHUFFLE, 5), (MM_AFTER, 5), (MM_PAIRS, 5), (MM_AFTER_PAIRS, 5)],
    ids=["gemv", "gemv-splitk", "gemv-prefetch", "gemv-mixed", "gemv-row-scales", "gemv-pairs", "gemv-pairs-3-rows",
         "mm", "mm-splitk", "mm-shuffle", "mm-after", "mm-pairs", "mm-after-pairs"],
)
@pytest.mark.parametrize("rows,K,block_size,double_quant", GROUP_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_group_is_one_launch_over_the_weights(plan, M, rows, K, block_size, double_quant, bias, monkeypatch):
    nf4, biases, ref_weight, ref_bias = _group(rows, K, block_size, double_quant, torch.bfloat16, bias)
    x = torch.randn(M, 1, K, device=DEVICE).to(torch.bfloat16)
    monkeypatch.setattr(triton_linear, "nf4_linear", None)  # the one-by-one fallback would fail
    out = triton_linear.nf4_linear_group(x, *nf4, block_size, list(rows), K, biases, plan=plan)
    ref = x.double() @ ref_weight.T + ref_bias
    assert out.shape == (M, 1, sum(rows)) and out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("plan,M", [(MMA_GEMV, 1), (MMA_GEMV_SPLIT, 8), (MMA_GEMV, 11), (MMA_GEMV_QUAD, 5),
                                    (MMA_GEMV_TWO_TILES_QUAD, 6)],
                         ids=["mma-gemv", "mma-gemv-splitk-8-rows", "mma-gemv-11-rows", "mma-gemv-quad", "mma-gemv-two-tiles"])
@pytest.mark.parametrize("rows,K,block_size,double_quant", [GROUP_CASES[0], GROUP_CASES[2]])
def test_mma_gemv_group_is_one_launch_over_the_weights(plan, M, rows, K, block_size, double_quant, monkeypatch):
    nf4, biases, ref_weight, ref_bias = _group(rows, K, block_size, double_quant, torch.bfloat16, True)
    x = torch.randn(M, K, device=DEVICE).to(torch.bfloat16)
    monkeypatch.setattr(triton_linear, "nf4_linear", None)  # the one-by-one fallback would fail
    out = triton_linear.nf4_linear_group(x, *nf4, block_size, list(rows), K, biases, plan=plan)
    assert out.shape == (M, sum(rows)) and rel_err(out, x.double() @ ref_weight.T + ref_bias) < 1e-2


def test_mm_group_of_more_rows_than_a_tile_from_a_strided_input(monkeypatch):
    nf4, biases, ref_weight, ref_bias = _group((40, 24, 8), 192, 64, True, torch.bfloat16, True)
    x = torch.randn(17, 384, device=DEVICE).to(torch.bfloat16)[:, ::2]  # 17 rows: two tiles of BLOCK_M = 16
    monkeypatch.setattr(triton_linear, "nf4_linear", None)
    out = triton_linear.nf4_linear_group(x, *nf4, 64, [40, 24, 8], 192, biases, plan=MM_SPLIT)
    assert out.shape == (17, 72) and rel_err(out, x.double() @ ref_weight.T + ref_bias) < 1e-2


@pytest.mark.parametrize("M", [1, 3])
def test_linear_group_falls_back_to_one_linear_each(M):
    # Weights of two scale formats (and M = 3 rows): each linear on its own path, outputs side by side.
    made = [make_weight(40, 192, 64, True), make_weight(24, 192, 64, False)]
    nf4 = [list(parts) for parts in zip(*(m[0] for m in made))]
    x = torch.randn(M, 192, device=DEVICE).to(torch.bfloat16)
    out = triton_linear.nf4_linear_group(x, *nf4, 64, [40, 24], 192, [None, None])
    ref = x.double() @ torch.cat([m[1] for m in made]).T
    assert out.shape == (M, 64) and rel_err(out, ref) < 1e-2


def test_linear_group_refuses_lists_of_different_lengths():
    (packed, absmax, nested, offset), _ = make_weight(40, 192, 64, True)
    x = torch.randn(1, 192, device=DEVICE).to(torch.bfloat16)
    with pytest.raises(ValueError, match="same number of weights"):
        triton_linear.nf4_linear_group(x, [packed, packed], [absmax], [nested], [offset], 64, [40], 192, [None])


@pytest.mark.parametrize(
    "plan", [MM, MM_SPLIT, MM_WIDE, MM_SHUFFLE, MM_AFTER, MM_AFTER_SPLIT, MM_PAIRS, MM_AFTER_PAIRS],
    ids=["mm", "mm-splitk", "mm-wide", "mm-shuffle", "mm-scale-after", "mm-scale-after-splitk", "mm-pairs",
         "mm-scale-after-pairs"],
)
@pytest.mark.parametrize("N,K,block_size,double_quant", LINEAR_CASES)
@pytest.mark.parametrize("x_at_w", [False, True], ids=["xWt", "xW"])
def test_mm(plan, N, K, block_size, double_quant, x_at_w):
    M = 17 if plan is MM_WIDE else 3
    _check_linear(plan, N, K, block_size, double_quant, M, torch.bfloat16, bias=not x_at_w, x_at_w=x_at_w)


@pytest.mark.parametrize("x_at_w", [False, True], ids=["xWt", "xW"])
def test_mm_fp16_and_batch_dims(x_at_w):
    _check_linear(MM, 40, 192, 64, True, None, torch.float16, bias=True, x_at_w=x_at_w, x_shape=(2, 9))


@pytest.mark.parametrize("x_at_w", [False, True], ids=["xWt", "xW"])
def test_dequant_path(x_at_w):
    _check_linear(DEQUANT, 37, 96, 32, True, 5, torch.bfloat16, bias=True, x_at_w=x_at_w)


# linear through the dispatcher ------------------------------------------------------------------


@pytest.mark.parametrize("M", [1, 3, 17])
def test_dispatch_numerics(M):
    _check_linear(None, 40, 192, 64, True, M, torch.bfloat16, bias=True)


def test_dispatch_blocks_spanning_rows():
    # K % block_size != 0: a block straddles two rows, which only the dequantize path handles.
    (packed, absmax, nested, offset), w64 = make_weight(33, 33, 64, True)
    x = torch.randn(3, 33, device=DEVICE, dtype=torch.bfloat16)
    assert triton_linear.plan_for(x, packed, absmax, nested, offset, 64, 33, 33, None, False)["path"] == "dequant"
    out = triton_linear.nf4_linear(x, packed, absmax, nested, offset, 64, 33, 33)
    assert rel_err(out, x.double() @ w64.T) < 1e-2


def test_dispatch_strided_input_and_empty_batch():
    (packed, absmax, nested, offset), w64 = make_weight(24, 64, 64, False)
    x = torch.randn(64, 6, device=DEVICE, dtype=torch.bfloat16).t()  # [6, 64], column-major
    out = triton_linear.nf4_linear(x, packed, absmax, nested, offset, 64, 24, 64)
    assert rel_err(out, x.double() @ w64.T) < 1e-2
    empty = torch.empty(2, 0, 64, device=DEVICE, dtype=torch.bfloat16)
    assert triton_linear.nf4_linear(empty, packed, absmax, nested, offset, 64, 24, 64).shape == (2, 0, 24)


def test_dispatch_unaligned_codes():
    # The fused kernels read codes as 32-bit words; codes at an odd address go through dequantize.
    (packed, absmax, nested, offset), w64 = make_weight(24, 64, 64, True)
    shifted = torch.empty(packed.numel() + 1, dtype=torch.uint8, device=DEVICE)
    shifted[1:] = packed
    x = torch.randn(1, 64, device=DEVICE, dtype=torch.bfloat16)
    out = triton_linear.nf4_linear(x, shifted[1:], absmax, nested, offset, 64, 24, 64, plan=GEMV)
    assert rel_err(out, x.double() @ w64.T) < 1e-2


def test_dispatch_rule():
    """Default plans (no tuned entry): gemv for one row, mm up to MM_MAX_M, then dequant. (The gemv serves up to
    GEMV_MAX_M rows where a tuned plan chose it.)"""
    plan = triton_linear.default_plan
    dev = torch.device(DEVICE)
    bf16, fp32 = torch.bfloat16, torch.float32
    assert plan(1, 4096, 4096, False, bf16, dev)["path"] == "gemv"
    assert plan(2, 4096, 4096, False, bf16, dev)["path"] == "mm"
    assert plan(1, 4096, 4096, True, bf16, dev)["path"] == "mm"  # no gemv for x @ W
    assert plan(triton_linear.MM_MAX_M, 4096, 4096, False, bf16, dev)["path"] == "mm"
    assert plan(triton_linear.MM_MAX_M + 1, 4096, 4096, False, bf16, dev)["path"] == "dequant"
    assert plan(1, 4096, 4096, False, fp32, dev)["path"] == "gemv"
    assert plan(2, 4096, 4096, False, fp32, dev)["path"] == "dequant"  # fp32 never takes tl.dot
    # A small N asks for split-K so that the grid covers the SMs.
    assert plan(1, 256, 8192, False, bf16, dev)["config"]["SPLIT_K"] > 1


def test_plan_is_cached():
    (packed, absmax, nested, offset), _ = make_weight(24, 64, 64, False)
    x = torch.randn(3, 64, device=DEVICE, dtype=torch.bfloat16)
    args = (x, packed, absmax, nested, offset, 64, 24, 64, None, False)
    assert triton_linear.plan_for(*args) is triton_linear.plan_for(*args)


def test_untuned_shapes_borrow_the_plan_of_the_nearest_width_at_their_bucket(monkeypatch):
    gemv_11008 = {"path": "gemv", "config": dict(GEMV_SHUFFLE["config"], BLOCK_N=32)}
    gemv_14336 = {"path": "gemv", "config": dict(GEMV_SHUFFLE["config"], BLOCK_N=16)}
    shipped = {
        (False, 11008, 4096, 1): gemv_11008, (False, 14336, 4096, 1): gemv_14336,
        (False, 14336, 4096, 16): MM, (False, 4096, 11008, 1): GEMV, (False, 11008, 4096, 4): GEMV_PAIRS,
        (False, 11008, 2048, 8): MMA_GEMV,
    }
    monkeypatch.setattr(triton_linear, "_shipped_plans", lambda device: shipped)
    nearest = lambda key, M: triton_linear._nearest_shipped(key, M, torch.bfloat16, torch.device(DEVICE))
    assert nearest((False, 12288, 4096, 1), 1) is gemv_11008  # q, k and v of Llama-2-7B: 12288 is nearer 11008
    assert nearest((False, 28672, 4096, 1), 1) is gemv_14336  # gate and up of Llama-3-8B
    assert nearest((False, 14336, 4096, 4), 4) is MM  # a tuned shape: its nearest tuned bucket
    assert nearest((False, 12288, 4096, 16), 16) is MM  # q, k and v at batch 16: the mm plan of 14336 at M = 16
    assert nearest((False, 12288, 4096, 8), 8) is None  # no tuned shape of that K at that bucket: the defaults
    assert nearest((False, 12288, 2048, 1), 1) is None  # no tuned shape of that K
    # A gemv plan serves its own bucket only (a one-row tile may spill registers with eight rows).
    assert nearest((False, 4096, 11008, 2), 2) is None
    assert nearest((False, 12288, 4096, 4), 4) is GEMV_PAIRS  # tuned for 4 rows of the nearest width
    # An mma_gemv plan serves any M up to 8 at one cost: lent to its shape's buckets up to 8 (not to 16, its second
    # tile of rows, which takes a plan tuned there), to other widths at its own bucket only.
    assert nearest((False, 12288, 2048, 8), 8) is MMA_GEMV
    assert nearest((False, 11008, 2048, 2), 2) is MMA_GEMV
    assert nearest((False, 11008, 2048, 16), 16) is None
    assert nearest((False, 12288, 2048, 4), 4) is None


def test_gpu_chip_names_the_shipped_file():
    assert triton_linear.gpu_chip("NVIDIA H100 80GB HBM3") == "h100"
    assert triton_linear.gpu_chip("NVIDIA H200") == "h200"
    assert triton_linear.gpu_chip("NVIDIA A100-SXM4-80GB") == "a100"
    assert triton_linear.tuned_configs("h100").exists()


def test_hopper_gpus_without_plans_of_their_own_read_the_h100s(monkeypatch):
    monkeypatch.delenv("NF4COMPILE_AUTOTUNE", raising=False)
    h100 = triton_linear.tuned_configs("h100")
    assert triton_linear.plans_file("NVIDIA H100 PCIe", (9, 0)) == h100
    assert triton_linear.plans_file("NVIDIA H200", (9, 0)) == h100
    assert triton_linear.plans_file("NVIDIA A100-SXM4-80GB", (8, 0)) is None  # another SM: the defaults
    assert triton_linear.plans_file("NVIDIA B200", (10, 0)) is None
    # Asked to tune, a chip tunes its own plans rather than borrow; the H100 keeps its shipped ones.
    assert triton_linear.plans_file("NVIDIA H200", (9, 0), autotune=True) is None
    assert triton_linear.plans_file("NVIDIA H100 PCIe", (9, 0), autotune=True) == h100
    # The dispatcher reads them for such a device (the CUDA queries answered here, no GPU needed).
    monkeypatch.setattr(triton_linear, "_SHIPPED", {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    shipped = triton_linear._shipped_plans(torch.device("cuda"))
    keys = {(e["x_at_w"], e["N"], e["K"], e["m_bucket"]) for e in json.loads(h100.read_text())["plans"]}
    assert set(shipped) == keys and shipped[(False, 4096, 4096, 1)]["path"] == "gemv"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert triton_linear._shipped_plans(torch.device("cuda")) == {}


def test_fastest_plan_skips_plans_that_do_not_fit_and_reports_every_timing(monkeypatch):
    # The tuner's choice without a GPU: each "call" returns its plan's time; one plan does not fit.
    times = {"a": 30.0, "b": 10.0, "c": 20.0}

    def graph_us(calls):
        if calls[0]() == "big":
            raise triton.runtime.errors.OutOfResources(1, 0, "shared memory")
        return sum(times[call()] for call in calls) / len(calls)

    monkeypatch.setattr(triton_linear, "cuda_graph_us", graph_us)
    timings = []
    best = triton_linear.fastest_plan(["a", "big", "b", "c"], lambda plan: [lambda: plan] * 3, timings)
    assert best == "b" and timings == [("a", 0.03), ("b", 0.01), ("c", 0.02)]


def test_scale_after_plans_are_candidates_only_for_x_times_w_transposed_up_to_m_16():
    def scale_after(M, x_at_w):
        return [p for p in triton_linear.candidate_plans(M, x_at_w, torch.bfloat16) if p.get("config", {}).get("scale")]
    assert scale_after(4, False) and scale_after(16, False)
    assert not scale_after(16, True) and not scale_after(64, False)


def test_pairs_plans_are_candidates_for_16_bit_activations_only():
    def lookups(M, dtype, path):
        return {p["config"].get("lookup") for p in triton_linear.candidate_plans(M, False, dtype) if p["path"] == path}

    assert "pairs" in lookups(1, torch.bfloat16, "gemv") and "pairs" in lookups(1, torch.float16, "gemv")
    assert "pairs" not in lookups(1, torch.float32, "gemv") and "shuffle" in lookups(1, torch.float32, "gemv")
    for M in (4, 16, 64):
        assert "pairs" in lookups(M, torch.bfloat16, "mm") and "shuffle" in lookups(M, torch.bfloat16, "mm")


def test_fit_pair_table_opts_in_what_passes_48_kb_and_refuses_what_passes_the_gpu(monkeypatch):
    """fit_pair_table's decisions, against a stand-in for the driver (the GPU test above runs the real one): static
    32 KB + Triton's share above 48 KB is opted in to the GPU's limit less the static part, once per kernel; at or
    below 48 KB nothing is set; past the limit, OutOfResources (which the tuner skips)."""
    static_bytes, limit = 32 * 1024, 227 * 1024
    set_calls = []

    class Driver:
        def cuFuncGetAttribute(self, value, attribute, function):
            value._obj.value = static_bytes
            return 0

        def cuFuncSetAttribute(self, function, attribute, value):
            set_calls.append((function.value, attribute, value.value))
            return 0

    class Kernel:
        def __init__(self, function, shared):
            self.function, self.metadata = function, SimpleNamespace(shared=shared)

        def _init_handles(self):
            pass

    monkeypatch.setattr(triton_dequantize, "_libcuda", lambda: Driver())
    monkeypatch.setattr(triton_dequantize, "_FITTED_KERNELS", set())
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(shared_memory_per_block_optin=limit))
    triton_dequantize.fit_pair_table(Kernel(1, 16 * 1024), "cuda")  # 48 KB in all: CUDA's default suffices
    assert set_calls == []
    triton_dequantize.fit_pair_table(Kernel(2, 20 * 1024), "cuda")
    triton_dequantize.fit_pair_table(Kernel(2, 20 * 1024), "cuda")  # the same loaded kernel: once
    assert set_calls == [(2, 8, limit - static_bytes)]
    with pytest.raises(triton.runtime.errors.OutOfResources):
        triton_dequantize.fit_pair_table(Kernel(3, limit - static_bytes + 1), "cuda")


@pytest.mark.parametrize("path", sorted(Path(triton_linear.__file__).parent.glob("tuned_configs_*.json")), ids=lambda p: p.name)
def test_shipped_configs_are_candidates(path):
    entries = json.loads(path.read_text())["plans"]
    assert entries
    for e in entries:
        candidates = triton_linear.candidate_plans(e["m_bucket"], e["x_at_w"], torch.bfloat16)
        assert {k: e[k] for k in ("path", "config") if k in e} in candidates, e


# On a GPU: Llama shapes through the registered ops -----------------------------------------------

LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]


@pytest.mark.parametrize("N,K", LLAMA_SHAPES)
@pytest.mark.parametrize("M", [1, 4, 16, 64, 256, 2048])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.cuda
@requires_cuda
def test_llama_shapes_cuda(N, K, M, double_quant):
    (packed, absmax, nested, offset), w64 = make_weight(N, K, 64, double_quant)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    out = torch.ops.nf4compile.linear(x, packed, absmax, nested, offset, 64, N, K, bias)
    assert rel_err(out, x.double() @ w64.T + bias.double()) < 1e-2
    grad = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    out_t = torch.ops.nf4compile.linear(grad, packed, absmax, nested, offset, 64, N, K, None, True)
    assert rel_err(out_t, grad.double() @ w64) < 1e-2


@pytest.mark.parametrize("M,x_at_w", [(1, False), (3, False), (8, False), (16, False), (64, False), (256, False), (16, True)])
@pytest.mark.cuda
@requires_cuda
def test_every_candidate_plan_cuda(M, x_at_w):
    """Every plan the tuner may ship (both lookups), on a shape every tile divides: the kernels that
    the Llama shapes of bench/nf4_kernels.py compile."""
    N, K = 512, 2048
    (packed, absmax, nested, offset), w64 = make_weight(N, K, 64, True)
    x = torch.randn(M, N if x_at_w else K, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ (w64 if x_at_w else w64.T)
    for plan in triton_linear.candidate_plans(M, x_at_w, torch.bfloat16):
        out = triton_linear.nf4_linear(x, packed, absmax, nested, offset, 64, N, K, None, x_at_w, plan=plan)
        assert rel_err(out, ref) < 1e-2, plan


@pytest.mark.cuda
@requires_cuda
def test_pairs_gemm_opts_into_more_than_48_kb_of_shared_memory_cuda(monkeypatch):
    """The pair table's 32 KB of static shared memory plus Triton's own share pass 48 KB on some GEMM tiles,
    which CUDA launches only after fit_pair_table opts them in: without it some candidate fails to launch."""
    N, K = 512, 2048
    (packed, absmax, nested, offset), w64 = make_weight(N, K, 64, True)
    x = torch.randn(4, K, device="cuda", dtype=torch.bfloat16)
    pairs = [p for p in triton_linear.candidate_plans(4, False, torch.bfloat16)
             if p["path"] == "mm" and p["config"].get("lookup") == "pairs"]
    assert pairs
    with monkeypatch.context() as patch:
        patch.setattr(triton_linear, "fit_pair_table", lambda kernel, device: None)
        failures = 0
        for plan in pairs:
            try:
                triton_linear.nf4_linear(x, packed, absmax, nested, offset, 64, N, K, plan=plan)
                torch.cuda.synchronize()
            except RuntimeError:
                failures += 1
    assert failures > 0
    for plan in pairs:
        out = triton_linear.nf4_linear(x, packed, absmax, nested, offset, 64, N, K, plan=plan)
        assert rel_err(out, x.double() @ w64.T) < 1e-2, plan


@pytest.mark.cuda
@requires_cuda
def test_tuner_times_every_candidate_in_cuda_graphs_and_caches_the_fastest(monkeypatch):
    N, K = 512, 2048
    (packed, absmax, nested, offset), w64 = make_weight(N, K, 64, True)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setattr(triton_linear, "_PLANS", {})
    timings = []
    plan = triton_linear.tune_plan(x, packed, absmax, nested, offset, 64, N, K, None, False, timings)
    candidates = triton_linear.candidate_plans(1, False, torch.bfloat16)
    assert len(timings) >= len(candidates) - 2  # a config may not fit the GPU (OutOfResources)
    assert all(p in candidates and ms > 0 for p, ms in timings)
    assert plan is min(timings, key=lambda t: t[1])[0]
    assert triton_linear._PLANS[(False, N, K, 1, torch.bfloat16, 64)] is plan
    out = triton_linear.nf4_linear(x, packed, absmax, nested, offset, 64, N, K, None, False, plan=plan)
    assert rel_err(out, x.double() @ w64.T) < 1e-2


@pytest.mark.cuda
@requires_cuda
def test_dequantize_op_cuda_bit_exact():
    (packed, absmax, nested, offset), w64 = make_weight(11008, 4096, 64, True)
    out = torch.ops.nf4compile.dequantize(packed, absmax, nested, offset, 64, [11008, 4096], torch.bfloat16)
    assert torch.equal(out, w64.float().to(torch.bfloat16))


@pytest.mark.cuda
@requires_cuda
def test_backward_and_cuda_graph():
    (packed, absmax, nested, offset), w64 = make_weight(4096, 4096, 64, True)
    x = torch.randn(2, 3, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = torch.ops.nf4compile.linear(x, packed, absmax, nested, offset, 64, 4096, 4096)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert rel_err(x.grad, grad.double() @ w64) < 1e-2
    # Plans are chosen on the first (eager) call; a captured graph replays the same kernels.
    static_x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    torch.ops.nf4compile.linear(static_x, packed, absmax, nested, offset, 64, 4096, 4096)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = torch.ops.nf4compile.linear(static_x, packed, absmax, nested, offset, 64, 4096, 4096)
    static_x.copy_(torch.randn_like(static_x))
    static_out.fill_(float("nan"))
    graph.replay()
    assert rel_err(static_out, static_x.double() @ w64.T) < 1e-2


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
