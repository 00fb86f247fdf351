"""CUDA implementation of ``nf4compile.linear``: fused NF4 GEMV and GEMM kernels and their dispatcher.

Three paths; each call picks one by M (the activation rows) and the weight's shape, because the graph
passes only rewrite ``dequantize -> mm`` into ``nf4compile.linear`` and leave the choice to run time:
  gemv     x @ W.T for one row of activations (decode): dot products on CUDA cores, W read once,
           split-K where N is small. Per-thread partial sums, reduced once after the K loop; each
           code costs a shift, a codebook lookup and a multiply-add. Bound by the shared-memory
           pipe that serves the lookups and by latency, not yet by HBM: bench/NOTES.md.
  mm       tl.dot on tensor cores, either orientation (x @ W.T, or x @ W for the backward). The
           dequantized weight tile is the left operand (out^T = W x^T): W's rows fill the MMA's wide
           side and M only its narrow one, so M = 16 costs what M = 4 costs.
  dequant  dequantize to x.dtype, then cuBLAS: for large M, where cuBLAS's GEMM outruns a Triton
           kernel that decodes each weight tile once per M tile by more than writing the dense weight
           costs; also for blocks that span rows (K % block_size != 0) and other dtypes.
Which path and which kernel config serve a (orientation, N, K, M bucket) is a "plan". Plans come
from ops/tuned_configs_h100.json on an H100, from tuning once per key when NF4COMPILE_AUTOTUNE=1,
and otherwise from the measured defaults below. A plan, once chosen, is cached: never re-tuned.

Both fused kernels look codes up in the 16-entry codebook either in shared memory or by warp
shuffles from registers (a plan's "lookup"), whichever measured faster for the shape.

Activations: fp16 and bf16 take every path. fp32 activations take the gemv path (exact fp32
arithmetic) or dequantize to fp32 + torch.matmul, which keeps torch's TF32 setting in charge; the
fused tensor-core path is not used for fp32.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Optional

import torch
import triton
import triton.language as tl

from nf4compile.ops.nf4_ops import ACTIVATION_DTYPES, check_linear_args, check_scales, register_linear_kernel
from nf4compile.ops.triton_dequantize import (
    lane_codebook, load_scales, lookup, lookup_tables, masked_load, nf4_dequantize, shuffle_lookup, well_formed,
)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TUNED_CONFIGS = Path(__file__).with_name("tuned_configs_h100.json")

# Measured on an H100 (bench/NOTES.md): the gemv kernel serves one row of activations (decode): mm
# took M = 4 from the earlier multi-row gemv on 6 of 7 shapes, its cost barely grows with M <= 16.
# mm beats dequantize + cuBLAS up to M = 64 (M = 256 on some shapes). Used where no tuned plan
# covers the shape.
GEMV_MAX_M = 1
MM_MAX_M = 256
# CUDA's limit on grid axes 1 and 2 (axis 0 allows 2**31 - 1), and the largest element offset the
# kernels compute in int32 (activation and output rows; weight offsets are int64).
MAX_GRID_YZ = 65535
MAX_INT32_OFFSET = 2**31 - 1


@triton.jit
def _load_tile(
    packed_ptr, absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, rows, row_mask, k0, K, stride_w,
    QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, GROUPS: tl.constexpr, SUB: tl.constexpr,
    EVEN: tl.constexpr,
):
    """The codes of W[rows, k0 : k0 + GROUPS * SUB] as 32-bit words [len(rows), GROUPS, SUB // 8]
    (8 codes each, zero outside W) and the scales of its groups [len(rows), GROUPS].

    Needs K % QBLOCK == 0 (no quantization block spans two rows), so a group of SUB columns has one
    scale, loaded once per group rather than once per weight.
    """
    # Loaded as a 2-D tile (16-byte loads, a thread's rows over the same columns, so that the
    # activations it converts serve all of them), then viewed per group.
    word_col = k0 // 8 + tl.arange(0, GROUPS * SUB // 8)
    word_ptr = packed_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None].to(tl.int64) * stride_w + word_col[None, :]
    words = masked_load(word_ptr, row_mask[:, None] & (word_col < K // 8)[None, :], 0, EVEN)
    g_col = k0 + tl.arange(0, GROUPS) * SUB
    mask = row_mask[:, None] & (g_col < K)[None, :]
    blk = rows[:, None] * (K // QBLOCK) + g_col[None, :] // QBLOCK
    scale = load_scales(absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, blk, mask, DOUBLE_QUANT, EVEN)
    return tl.reshape(words, [rows.shape[0], GROUPS, SUB // 8]), scale


@triton.jit
def _codes(words):
    """The 8 codes of each little-endian word, in element order along a new minor axis of 8.

    Code p sits at bit 8 * (p // 2) + 4 * (1 - p % 2) (element 2j is the high nibble of byte j).
    Each tl.join adds a minor axis of 2, so after three nested joins a code's position is
    4 * (its place in the innermost pair) + 2 * (in the middle pair) + (in the outer pair):
    hence the pairs (0, 4), (2, 6) | (1, 5), (3, 7), written below as their bit offsets.
    """
    codes = tl.join(
        tl.join(tl.join(words >> 4, words >> 20), tl.join(words >> 12, words >> 28)),
        tl.join(tl.join(words, words >> 16), tl.join(words >> 8, words >> 24)),
    )
    return tl.reshape(codes, [words.shape[0], words.shape[1], words.shape[2], 8])


@triton.jit
def _codebook(code_ptr, SHUFFLE: tl.constexpr):
    """What _decode reads the codebook from (loaded once, before a kernel's K loop)."""
    if SHUFFLE:
        return lane_codebook(code_ptr)
    else:
        return tl.load(code_ptr + tl.arange(0, 16))


@triton.jit
def _decode(table, codes, SHUFFLE: tl.constexpr):
    """The codebook values (fp32) of ``codes`` (only their low 4 bits count), by warp shuffles or
    shared-memory loads: plans choose per shape (tuned on an H100: bench/NOTES.md)."""
    if SHUFFLE:
        return shuffle_lookup(table, codes)
    else:
        return lookup(table, codes)


# gemv -------------------------------------------------------------------------------------------


@triton.jit
def _nf4_gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, dyn_ptr, bias_ptr, out_ptr,
    N, K, stride_w,
    QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, SUB: tl.constexpr,
    SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr, EVEN: tl.constexpr, SHUFFLE: tl.constexpr,
):
    # x [1, K] @ W.T: a program owns BLOCK_N rows of W and one of SPLIT_K slices of K, and streams
    # that slice in steps of BLOCK_K columns.
    BLOCK_K: tl.constexpr = GROUPS * SUB
    WORDS: tl.constexpr = SUB // 8
    pid_k = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    g_col = tl.arange(0, GROUPS) * SUB
    x_col = g_col[:, None, None] + tl.arange(0, WORDS)[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    table = _codebook(code_ptr, SHUFFLE)
    # Partial sums per word, reduced across threads once after the loop, not every step. Scales
    # multiply each word's dot product, not each weight.
    acc = tl.zeros([BLOCK_N, GROUPS, WORDS], dtype=tl.float32)
    # Pipelined explicitly: Triton only pipelines loops with a tl.dot by itself.
    for k0 in tl.range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K, num_stages=NUM_STAGES):
        words, scale = _load_tile(
            packed_ptr, absmax_ptr, nested_ptr, offset_ptr, dyn_ptr,
            rows, row_mask, k0, K, stride_w, QBLOCK, DOUBLE_QUANT, GROUPS, SUB, EVEN,
        )
        x = masked_load(x_ptr + k0 + x_col, (k0 + g_col < K)[:, None, None], 0.0, EVEN).to(tl.float32)
        acc += tl.sum(_decode(table, _codes(words), SHUFFLE) * x[None, :, :, :], axis=3) * scale[:, :, None]
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        out += tl.where(pid_k == 0, bias, 0.0)
    if SPLIT_K == 1:
        tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_mask)
    else:
        tl.atomic_add(out_ptr + rows, out, mask=row_mask, sem="relaxed")


# BLOCK_N rows x BLOCK_K columns per step. Triton lays a [BLOCK_N, BLOCK_K / 8] tile of words out as
# 16-byte runs along K, 64 words per warp row: tiles with more rows than the warps cover give each
# thread several rows over the same columns (x converted once for them all): 4 rows per thread
# compile to ~5.3 SASS instructions per weight, 2 rows ~6.0, 1 row ~7.8 (bench/NOTES.md). Small N
# wants short tiles or split-K to fill the SMs.
GEMV_CONFIGS = [
    dict(BLOCK_N=8, BLOCK_K=512, SPLIT_K=1, num_warps=4, num_stages=3),
    dict(BLOCK_N=16, BLOCK_K=512, SPLIT_K=1, num_warps=4, num_stages=3),
    dict(BLOCK_N=16, BLOCK_K=512, SPLIT_K=1, num_warps=4, num_stages=5),
    dict(BLOCK_N=32, BLOCK_K=256, SPLIT_K=1, num_warps=4, num_stages=4),
    dict(BLOCK_N=32, BLOCK_K=512, SPLIT_K=1, num_warps=4, num_stages=3),
    dict(BLOCK_N=64, BLOCK_K=256, SPLIT_K=1, num_warps=4, num_stages=3),
    dict(BLOCK_N=64, BLOCK_K=512, SPLIT_K=1, num_warps=8, num_stages=3),
    dict(BLOCK_N=8, BLOCK_K=2048, SPLIT_K=1, num_warps=4, num_stages=2),
    dict(BLOCK_N=16, BLOCK_K=512, SPLIT_K=2, num_warps=4, num_stages=3),
    dict(BLOCK_N=32, BLOCK_K=512, SPLIT_K=2, num_warps=4, num_stages=3),
    dict(BLOCK_N=32, BLOCK_K=512, SPLIT_K=4, num_warps=4, num_stages=3),
    dict(BLOCK_N=16, BLOCK_K=512, SPLIT_K=1, num_warps=4, num_stages=3, lookup="shuffle"),
    dict(BLOCK_N=32, BLOCK_K=512, SPLIT_K=1, num_warps=4, num_stages=3, lookup="shuffle"),
    # num_stages=1: no cp.async staging of the codes through shared memory, whose pipe the
    # shared-memory lookups already saturate (ncu, bench/NOTES.md); loads stay in flight through
    # occupancy and several 16-byte loads per thread instead.
    dict(BLOCK_N=16, BLOCK_K=512, SPLIT_K=1, num_warps=4, num_stages=1),
    dict(BLOCK_N=16, BLOCK_K=512, SPLIT_K=1, num_warps=4, num_stages=1, lookup="shuffle"),
    dict(BLOCK_N=32, BLOCK_K=512, SPLIT_K=1, num_warps=8, num_stages=1, lookup="shuffle"),
    dict(BLOCK_N=16, BLOCK_K=1024, SPLIT_K=1, num_warps=8, num_stages=1, lookup="shuffle"),
    dict(BLOCK_N=16, BLOCK_K=512, SPLIT_K=2, num_warps=4, num_stages=1, lookup="shuffle"),
]


def nf4_gemv(x2, packed, absmax, nested_absmax, offset, block_size, N, K, bias, config):
    """Launch wrapper: x2 [1, K] @ W.T (+ bias) -> [1, N] in x2.dtype."""
    assert x2.shape[0] == 1, "the gemv kernel serves one row of activations"
    split_k = config["SPLIT_K"]
    out = _output(1, N, x2, split_k)
    code, dyn = lookup_tables(x2.device)
    sub = min(config["BLOCK_K"], block_size)
    grid = (-(-N // config["BLOCK_N"]), split_k)
    _nf4_gemv_kernel[grid](
        x2, packed, absmax, *_nested_args(absmax, nested_absmax, offset), code, dyn,
        bias if bias is not None else out, out, N, K, K // 8,
        QBLOCK=block_size, DOUBLE_QUANT=nested_absmax is not None, HAS_BIAS=bias is not None,
        BLOCK_N=config["BLOCK_N"], GROUPS=config["BLOCK_K"] // sub, SUB=sub, SPLIT_K=split_k,
        NUM_STAGES=config["num_stages"], EVEN=N % config["BLOCK_N"] == 0 and K % config["BLOCK_K"] == 0,
        SHUFFLE=_shuffle(config), num_warps=config["num_warps"],
    )
    return out if split_k == 1 else out.to(x2.dtype)


# mm ---------------------------------------------------------------------------------------------


@triton.jit
def _nf4_mm_kernel(
    x_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, dyn_ptr, bias_ptr, out_ptr,
    M, N, K, stride_w, stride_xm, stride_om,
    QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
    X_AT_W: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_RED: tl.constexpr,
    GROUPS: tl.constexpr, SUB: tl.constexpr, SPLIT_K: tl.constexpr, EVEN: tl.constexpr, SHUFFLE: tl.constexpr,
):
    # out^T [BLOCK_OUT, BLOCK_M] += A @ x^T, A the decoded tile W[out, red] (x @ W.T) or W[red, out]^T
    # (x @ W). M is the fastest grid axis, so the programs sharing a weight tile run together and
    # its codes come from L2 after the first of them.
    if X_AT_W:
        OUT = K
        RED = N
    else:
        OUT = N
        RED = K
    pid_k = tl.program_id(2)
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    red_per_split = tl.cdiv(tl.cdiv(RED, BLOCK_RED), SPLIT_K) * BLOCK_RED
    r_start = pid_k * red_per_split
    table = _codebook(code_ptr, SHUFFLE)
    acc = tl.zeros([BLOCK_OUT, BLOCK_M], dtype=tl.float32)
    for r0 in range(r_start, tl.minimum(r_start + red_per_split, RED), BLOCK_RED):
        r = r0 + tl.arange(0, BLOCK_RED)
        if X_AT_W:
            words, scale = _load_tile(
                packed_ptr, absmax_ptr, nested_ptr, offset_ptr, dyn_ptr,
                r, r < N, tl.program_id(1) * BLOCK_OUT, K, stride_w, QBLOCK, DOUBLE_QUANT, GROUPS, SUB, EVEN,
            )
            a = tl.trans(tl.reshape(_decode(table, _codes(words), SHUFFLE) * scale[:, :, None, None], [BLOCK_RED, BLOCK_OUT]))
        else:
            words, scale = _load_tile(
                packed_ptr, absmax_ptr, nested_ptr, offset_ptr, dyn_ptr,
                o, o < N, r0, K, stride_w, QBLOCK, DOUBLE_QUANT, GROUPS, SUB, EVEN,
            )
            a = tl.reshape(_decode(table, _codes(words), SHUFFLE) * scale[:, :, None, None], [BLOCK_OUT, BLOCK_RED])
        # Rows of x past M are always masked (M is free); the reduced axis only when not EVEN.
        x_mask = (m < M)[None, :]
        if not EVEN:
            x_mask = x_mask & (r < RED)[:, None]
        x_t = tl.load(x_ptr + m[None, :] * stride_xm + r[:, None], mask=x_mask, other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), x_t.to(DOT_DTYPE), acc)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + o, mask=o < OUT, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[:, None]
    offs = m[None, :] * stride_om + o[:, None]
    mask = (m < M)[None, :] & (o < OUT)[:, None]
    if SPLIT_K == 1:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out_ptr + offs, acc, mask=mask, sem="relaxed")


# BLOCK_M is the MMA's narrow side: 16 covers M <= 16 with one tile. Small-M configs split K to put
# work on all SMs; large-M configs are classic GEMM tiles.
MM_CONFIGS = [
    dict(BLOCK_M=16, BLOCK_OUT=64, BLOCK_RED=128, SPLIT_K=1, num_warps=4, num_stages=3),
    dict(BLOCK_M=16, BLOCK_OUT=64, BLOCK_RED=128, SPLIT_K=4, num_warps=4, num_stages=3),
    dict(BLOCK_M=16, BLOCK_OUT=128, BLOCK_RED=128, SPLIT_K=2, num_warps=4, num_stages=3),
    dict(BLOCK_M=16, BLOCK_OUT=64, BLOCK_RED=256, SPLIT_K=2, num_warps=4, num_stages=3),
    dict(BLOCK_M=16, BLOCK_OUT=128, BLOCK_RED=128, SPLIT_K=4, num_warps=4, num_stages=4),
    dict(BLOCK_M=16, BLOCK_OUT=128, BLOCK_RED=128, SPLIT_K=2, num_warps=8, num_stages=3),
    dict(BLOCK_M=16, BLOCK_OUT=128, BLOCK_RED=256, SPLIT_K=1, num_warps=8, num_stages=3),
    dict(BLOCK_M=32, BLOCK_OUT=64, BLOCK_RED=128, SPLIT_K=2, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_OUT=64, BLOCK_RED=128, SPLIT_K=1, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_OUT=128, BLOCK_RED=64, SPLIT_K=2, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_OUT=128, BLOCK_RED=128, SPLIT_K=1, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_OUT=128, BLOCK_RED=64, SPLIT_K=1, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_OUT=128, BLOCK_RED=128, SPLIT_K=1, num_warps=8, num_stages=3),
    dict(BLOCK_M=256, BLOCK_OUT=128, BLOCK_RED=64, SPLIT_K=1, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_OUT=256, BLOCK_RED=64, SPLIT_K=1, num_warps=8, num_stages=3),
    # The same tiles decoding by warp shuffles (fewer instructions and registers; see _decode).
    dict(BLOCK_M=16, BLOCK_OUT=64, BLOCK_RED=128, SPLIT_K=4, num_warps=4, num_stages=3, lookup="shuffle"),
    dict(BLOCK_M=16, BLOCK_OUT=64, BLOCK_RED=256, SPLIT_K=2, num_warps=4, num_stages=3, lookup="shuffle"),
    dict(BLOCK_M=16, BLOCK_OUT=128, BLOCK_RED=128, SPLIT_K=4, num_warps=4, num_stages=4, lookup="shuffle"),
    dict(BLOCK_M=32, BLOCK_OUT=64, BLOCK_RED=128, SPLIT_K=2, num_warps=4, num_stages=3, lookup="shuffle"),
    dict(BLOCK_M=64, BLOCK_OUT=64, BLOCK_RED=128, SPLIT_K=1, num_warps=4, num_stages=3, lookup="shuffle"),
    dict(BLOCK_M=64, BLOCK_OUT=128, BLOCK_RED=128, SPLIT_K=1, num_warps=8, num_stages=3, lookup="shuffle"),
    dict(BLOCK_M=256, BLOCK_OUT=128, BLOCK_RED=64, SPLIT_K=1, num_warps=8, num_stages=3, lookup="shuffle"),
]


def nf4_mm(x2, packed, absmax, nested_absmax, offset, block_size, N, K, bias, x_at_w, config):
    """Launch wrapper: x2 [M, K] @ W.T, or x2 [M, N] @ W with ``x_at_w`` (+ bias), in x2.dtype."""
    M = x2.shape[0]
    out_dim = K if x_at_w else N
    split_k = config["SPLIT_K"]
    out = _output(M, out_dim, x2, split_k)
    code, dyn = lookup_tables(x2.device)
    tile_w = config["BLOCK_OUT"] if x_at_w else config["BLOCK_RED"]  # columns of W per tile
    sub = min(tile_w, block_size)
    grid = (-(-M // config["BLOCK_M"]), -(-out_dim // config["BLOCK_OUT"]), split_k)
    _nf4_mm_kernel[grid](
        x2, packed, absmax, *_nested_args(absmax, nested_absmax, offset), code, dyn,
        bias if bias is not None else out, out,
        M, N, K, K // 8, x2.stride(0), out.stride(0),
        QBLOCK=block_size, DOUBLE_QUANT=nested_absmax is not None, HAS_BIAS=bias is not None,
        # The interpreter computes bf16 dots wrongly: there the dot runs in fp32.
        X_AT_W=x_at_w, DOT_DTYPE=tl.float32 if INTERPRET else _TL_DTYPES[x2.dtype],
        BLOCK_M=config["BLOCK_M"], BLOCK_OUT=config["BLOCK_OUT"], BLOCK_RED=config["BLOCK_RED"],
        GROUPS=tile_w // sub, SUB=sub, SPLIT_K=split_k, SHUFFLE=_shuffle(config),
        EVEN=out_dim % config["BLOCK_OUT"] == 0 and (N if x_at_w else K) % config["BLOCK_RED"] == 0,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out if split_k == 1 else out.to(x2.dtype)


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _shuffle(config) -> bool:
    # Configs with "lookup": "shuffle" decode by warp shuffles, which run no PTX in the interpreter:
    # there they take the shared-memory lookup (the same values).
    return config.get("lookup") == "shuffle" and not INTERPRET


def _nested_args(absmax, nested_absmax, offset):
    # Without double quantization the kernels never read these; any pointer fills the slots.
    if nested_absmax is None:
        return absmax, absmax
    return nested_absmax, offset


def _output(M, out_dim, x2, split_k):
    # Split-K programs add fp32 partial sums into a zeroed buffer, cast once afterwards.
    if split_k == 1:
        return torch.empty(M, out_dim, dtype=x2.dtype, device=x2.device)
    return torch.zeros(M, out_dim, dtype=torch.float32, device=x2.device)


# dispatch ---------------------------------------------------------------------------------------


def _m_bucket(M: int) -> int:
    return min(1 << (M - 1).bit_length(), 4096)


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def _split_for(tiles: int, steps: int, sms: int) -> int:
    """Split-K factor that brings the grid to about two programs per SM, keeping >= 4 steps each."""
    split = 1
    while tiles * split < 2 * sms and steps // (2 * split) >= 4 and split < 8:
        split *= 2
    return split


def default_plan(M, N, K, x_at_w, dtype, device) -> dict:
    """The plan where nothing was tuned: thresholds on M, tile sizes by M, split-K to fill the SMs."""
    mixed = dtype in _TL_DTYPES
    sms = _num_sms(device)
    if not x_at_w and M <= GEMV_MAX_M:
        config = dict(BLOCK_N=16, BLOCK_K=512, SPLIT_K=1, num_warps=4, num_stages=3)
        config["SPLIT_K"] = _split_for(triton.cdiv(N, 16), triton.cdiv(K, 512), sms)
        return {"path": "gemv", "config": config}
    if not mixed or M > MM_MAX_M:
        return {"path": "dequant"}
    block_m = min(max(triton.next_power_of_2(M), 16), 64)
    out_dim, red = (K, N) if x_at_w else (N, K)
    config = dict(BLOCK_M=block_m, BLOCK_OUT=64, BLOCK_RED=128, SPLIT_K=1, num_warps=4, num_stages=3)
    config["SPLIT_K"] = _split_for(triton.cdiv(M, block_m) * triton.cdiv(out_dim, 64), triton.cdiv(red, 128), sms)
    return {"path": "mm", "config": config}


def candidate_plans(M, x_at_w, dtype) -> list[dict]:
    """Every plan the tuner times for a call with M activation rows."""
    plans = [{"path": "dequant"}]
    bucket = _m_bucket(M)
    if not x_at_w and bucket <= GEMV_MAX_M:
        plans += [{"path": "gemv", "config": c} for c in GEMV_CONFIGS]
    if dtype in _TL_DTYPES:
        # Tiles no taller than the bucket (16 at least), and none far shorter where M is large.
        fits = lambda c: c["BLOCK_M"] <= max(bucket, 16) and c["BLOCK_M"] * 4 >= min(bucket, 512)
        plans += [{"path": "mm", "config": c} for c in MM_CONFIGS if fits(c)]
    return plans


def run_plan(plan, x2, packed, absmax, nested_absmax, offset, block_size, N, K, bias, x_at_w):
    """[M, out] = x2 @ W.T or x2 @ W (+ bias) along ``plan``."""
    if plan["path"] == "gemv":
        return nf4_gemv(x2, packed, absmax, nested_absmax, offset, block_size, N, K, bias, plan["config"])
    if plan["path"] == "mm":
        return nf4_mm(x2, packed, absmax, nested_absmax, offset, block_size, N, K, bias, x_at_w, plan["config"])
    weight = nf4_dequantize(packed, absmax, nested_absmax, offset, block_size, [N, K], x2.dtype)
    bias = None if bias is None else bias.to(x2.dtype)
    if x_at_w:
        return x2 @ weight if bias is None else torch.addmm(bias, x2, weight)
    return torch.nn.functional.linear(x2, weight, bias)


_PLANS: dict[tuple, dict] = {}
_SHIPPED: dict[str, dict[tuple, dict]] = {}
# Choosing a plan (reading the shipped file, tuning) happens once per key, under this lock: two
# threads tuning at once would time each other's kernels. Cached plans are read without it.
_PLAN_LOCK = threading.Lock()
DEQUANT_PLAN = {"path": "dequant"}


def _shipped_plans(device: torch.device) -> dict[tuple, dict]:
    """Plans tuned on an H100 by bench/kernels.py --tune, used on H100s only."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    if name not in _SHIPPED:
        plans = {}
        if "H100" in name and TUNED_CONFIGS.exists():
            for entry in json.loads(TUNED_CONFIGS.read_text())["plans"]:
                key = (entry["x_at_w"], entry["N"], entry["K"], entry["m_bucket"])
                plans[key] = {k: entry[k] for k in ("path", "config") if k in entry}
        _SHIPPED[name] = plans
    return _SHIPPED[name]


def _nearest_shipped(key, M, dtype, device) -> Optional[dict]:
    # A bucket that was not tuned borrows the plan of the nearest tuned bucket of the same shape,
    # if that plan can serve this M and dtype.
    x_at_w, N, K, bucket = key
    usable = []
    for (xw, n, k, b), plan in _shipped_plans(device).items():
        if (xw, n, k) != (x_at_w, N, K):
            continue
        if (plan["path"] == "gemv" and M > GEMV_MAX_M) or (plan["path"] == "mm" and dtype not in _TL_DTYPES):
            continue
        usable.append((abs(b.bit_length() - bucket.bit_length()), -b, plan))
    return min(usable, key=lambda t: t[:2])[2] if usable else None


def cuda_graph_us(calls: list) -> float:
    """Median microseconds per call of one CUDA graph replaying ``calls`` back to back: no host time in
    it, which at small shapes is most of what a do_bench median measures (~70 us per eager call of
    this op on an H100 machine). Each call reading its own weight copy keeps L2 cold."""
    for call in calls:  # compiled and plans chosen outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(20):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / len(calls))
    return sorted(samples)[len(samples) // 2]


# Tuning replays each candidate over weight copies worth this many L2s (cold weights, as in a model).
TUNE_L2_FACTOR = 3


def tune_plan(x2, packed, absmax, nested_absmax, offset, block_size, N, K, bias, x_at_w, timings=None) -> dict:
    """Time every candidate plan on these arguments, as CUDA-graph replays over copies of the weight
    that overflow L2, and cache the fastest; ``timings``, a list, receives (plan, ms) for each."""
    weight = (packed, absmax, nested_absmax, offset)
    nbytes = sum(t.numel() * t.element_size() for t in weight if t is not None)
    l2 = torch.cuda.get_device_properties(x2.device).L2_cache_size
    n_copies = min(64, -(-TUNE_L2_FACTOR * l2 // nbytes))
    copies = [[None if t is None else t.clone() for t in weight] for _ in range(n_copies)]
    best, best_ms = None, float("inf")
    for plan in candidate_plans(x2.shape[0], x_at_w, x2.dtype):
        calls = [lambda c=c: run_plan(plan, x2, *c, block_size, N, K, bias, x_at_w) for c in copies]
        try:
            ms = cuda_graph_us(calls) / 1e3
        except triton.runtime.errors.OutOfResources:
            continue
        if timings is not None:
            timings.append((plan, ms))
        if ms < best_ms:
            best, best_ms = plan, ms
    _PLANS[(x_at_w, N, K, _m_bucket(x2.shape[0]), x2.dtype, block_size)] = best
    return best


def plan_for(x2, packed, absmax, nested_absmax, offset, block_size, N, K, bias, x_at_w) -> dict:
    M = x2.shape[0]
    key = (x_at_w, N, K, _m_bucket(M), x2.dtype, block_size)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    with _PLAN_LOCK:
        plan = _PLANS.get(key)  # another thread may have chosen it while this one waited
        if plan is not None:
            return plan
        if K % block_size or x2.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            plan = DEQUANT_PLAN
        else:
            plan = _nearest_shipped(key[:4], M, x2.dtype, x2.device)
        if plan is None:
            capturing = x2.is_cuda and torch.cuda.is_current_stream_capturing()
            if os.environ.get("NF4COMPILE_AUTOTUNE") == "1" and x2.is_cuda and not capturing and not INTERPRET:
                return tune_plan(x2, packed, absmax, nested_absmax, offset, block_size, N, K, bias, x_at_w)
            plan = default_plan(M, N, K, x_at_w, x2.dtype, x2.device)
        _PLANS[key] = plan
    return plan


def kernel_can_serve(plan: dict, x2: torch.Tensor, N: int, K: int, block_size: int, x_at_w: bool) -> bool:
    """Whether ``plan``'s fused kernel computes ``x2 @ W.T`` (or ``x2 @ W``) correctly. A plan is
    chosen per M bucket (the last holds every M > 2048) and may be forced, so this is checked per
    call: the fused kernels need whole quantization blocks per weight row, 16-bit activations for
    tl.dot, grid axes 1 and 2 within CUDA's limit and row offsets within int32; otherwise the
    dequantize path serves the call."""
    if plan["path"] == "dequant":
        return True
    M = x2.shape[0]
    if K % block_size:
        return False
    if plan["path"] == "gemv":
        return not x_at_w and M <= GEMV_MAX_M and x2.dtype in (torch.float16, torch.bfloat16, torch.float32)
    out_dim = K if x_at_w else N
    return (
        x2.dtype in _TL_DTYPES
        and -(-out_dim // plan["config"]["BLOCK_OUT"]) <= MAX_GRID_YZ
        and plan["config"]["SPLIT_K"] <= MAX_GRID_YZ
        and M * max(x2.stride(0), out_dim) <= MAX_INT32_OFFSET
    )


def nf4_linear(x, packed, absmax, nested_absmax, offset, block_size, out_features, in_features, bias=None,
               x_at_w=False, plan=None):
    """``nf4compile.linear`` on CUDA tensors (any tensors under TRITON_INTERPRET=1); ``plan`` forces a path."""
    N, K = out_features, in_features
    red, out_dim = (N, K) if x_at_w else (K, N)
    if (
        x.dim() == 0 or x.shape[-1] != red or x.dtype not in ACTIVATION_DTYPES or x.device != packed.device
        or (bias is not None and (bias.shape != (out_dim,) or bias.device != x.device or bias.dtype not in ACTIVATION_DTYPES))
    ):
        check_linear_args(x, packed, bias, N, K, x_at_w)  # raises
    if not well_formed(packed, absmax, nested_absmax, offset, block_size, N * K):
        check_scales(packed, absmax, nested_absmax, offset, block_size, N * K)
    out_shape = (*x.shape[:-1], out_dim)
    x2 = x.reshape(-1, red)
    if x2.shape[0] == 0:
        return x.new_empty(out_shape)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    # The kernels index the codes and scales as flat arrays (host time matters at decode: no
    # reshape or view that is not needed).
    if packed.dim() != 1:
        packed, absmax = packed.reshape(-1), absmax.reshape(-1)
    args = (x2, packed, absmax, nested_absmax, offset, block_size, N, K, bias, x_at_w)
    plan = plan or plan_for(*args)
    # The fused kernels read the codes as 32-bit words: codes at an unaligned address are dequantized.
    if packed.data_ptr() % 4 or not kernel_can_serve(plan, x2, N, K, block_size, x_at_w):
        plan = DEQUANT_PLAN
    out = run_plan(plan, *args)
    return out if x.dim() == 2 else out.view(out_shape)


def _linear_cuda(x, packed, absmax, nested_absmax, offset, block_size, out_features, in_features, bias=None,
                 x_at_w=False):
    return nf4_linear(x, packed, absmax, nested_absmax, offset, block_size, out_features, in_features, bias, x_at_w)


register_linear_kernel("CUDA", _linear_cuda)
