"""CUDA implementation of ``nf4compile.linear``: fused NF4 GEMV and GEMM kernels and their dispatcher.

Four paths; each call picks one by M (the activation rows) and the weight's shape, because the graph
passes only rewrite ``dequantize -> mm`` into ``nf4compile.linear`` and leave the choice to run time:
  gemv     x @ W.T for one row of activations (decode), or up to GEMV_MAX_M rows where a tuned plan
           chose it: dot products on CUDA cores, W read and decoded once for all rows, split-K where N
           is small. Per-thread partial sums, reduced once after the K loop; each code costs a shift, a
           codebook lookup and a multiply-add per row (a word's eight products one chain of multiply-adds). A plan may prefetch: the next step's loads are issued into
           registers before this step decodes, and load the scale parts in fewer sectors ("scales":
           "rows"). Bound by the L1's data pipe (a lookup per code, the scale parts), not yet by HBM:
           ncu, bench/NOTES.md.
  mma_gemv x @ W.T for up to 16 rows on the tensor cores by mma.sync (PTX), where a tuned plan chose it: each
           thread is one lane of an m16n8k16 mma (16 weight rows by 8 activation rows; a second mma on the same
           registers for rows 9-16), decodes its A fragment straight into registers by pair lookups and loads x
           as its B fragment, so a weight costs ~3.4 instructions for all 8 rows (offline sm_90) against the
           gemv's ~5 for one; no shared-memory round trip of the decoded tile, unlike mm. Bound by the L1, most of
           whose sectors are scale parts and activations (ncu); a plan may load a quarter of the scale parts
           ("scales": "quad") and give each warp two tiles of 16 weight rows on the same activations
           ("WEIGHT_TILES": 2: half the activations' loads per weight byte).
  mm       tl.dot on tensor cores, either orientation (x @ W.T, or x @ W for the backward). The
           dequantized weight tile is the left operand (out^T = W x^T): W's rows fill the MMA's wide
           side and M only its narrow one, so M = 16 costs what M = 4 costs. A plan may scale each
           quantization block's dot product instead of each weight (M <= 16).
  dequant  dequantize to x.dtype, then cuBLAS: for large M, where cuBLAS's GEMM outruns a Triton
           kernel that decodes each weight tile once per M tile by more than writing the dense weight
           costs; also for blocks that span rows (K % block_size != 0) and other dtypes.
Which path and which kernel config serve a (orientation, N, K, M bucket) is a "plan". Plans come
from ops/tuned_configs_<chip>.json on that chip (h100 is shipped), from tuning once per key when
NF4COMPILE_AUTOTUNE=1, and otherwise from the measured defaults below. A plan, once chosen, is cached: never re-tuned.

Both fused kernels look codes up in the 16-entry codebook either in shared memory or by warp
shuffles from registers (a plan's "lookup"), whichever measured faster for the shape; the gemv may
also mix the two, half the codes each ("mixed", see _word_dots). "pairs" reads two codes at once: a
byte's two values from a per-lane shared-memory copy of the 256 fp16 codebook pairs
(codebook_pairs), half the L1 operations of the other lookups, which bound the kernels.

Activations: fp16 and bf16 take every path. fp32 activations take the gemv path (exact fp32
arithmetic) or dequantize to fp32 + torch.matmul, which keeps torch's TF32 setting in charge; the
fused tensor-core path is not used for fp32.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from pathlib import Path
from typing import Optional

import torch
import triton
import triton.language as tl

from nf4compile.ops.nf4_ops import (
    ACTIVATION_DTYPES, check_linear_args, check_linear_group_args, check_scales, register_kernel,
)
from nf4compile.ops.triton_dequantize import (
    INTERPRET, PAIR_BYTE_SHIFTS, codebook_pairs, fit_pair_table, gather_table, lane_codebook, load_scale_parts, lookup,
    lookup_tables, masked_load, nf4_dequantize, pair_lookup, pair_values, resolve_scales, shuffle_lookup, well_formed,
)


def gpu_chip(device_name: str) -> str:
    """The chip a GPU's tuned plans are filed under: "NVIDIA H100 80GB HBM3" -> "h100"."""
    match = re.search(r"\b[A-Z]{1,2}\d{2,4}\b", device_name)
    return match.group(0).lower() if match else re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def tuned_configs(chip: str) -> Path:
    """Where bench/nf4_kernels.py --tune files a chip's plans and the dispatcher reads them."""
    return Path(__file__).with_name(f"tuned_configs_{chip}.json")


# Hopper GPUs without plans of their own (H200, H800, H20, ...) run the H100's: the same SM (registers, shared memory,
# mma.sync), so every plan fits and computes the same. They were timed for the H100's 132 SMs and bandwidth only:
# with NF4COMPILE_AUTOTUNE=1 such a chip tunes its own instead.
SAME_SM_PLANS = {(9, 0): "h100"}


def plans_file(device_name: str, capability: tuple[int, int], autotune: bool = False) -> Optional[Path]:
    """The tuned plans a GPU reads: its chip's own file, else (unless it will tune its own) its architecture's
    (SAME_SM_PLANS), else none."""
    own = tuned_configs(gpu_chip(device_name))
    if own.exists():
        return own
    borrowed = SAME_SM_PLANS.get(capability)
    if borrowed is None or autotune:
        return None
    path = tuned_configs(borrowed)
    return path if path.exists() else None


# The fused kernels were measured with multiply-adds contracted (FFMA): Triton 3.9 warns that 3.10 stops doing so by
# default, so every launch asks for it (the dequantize kernel asks for the opposite, for bitsandbytes' rounding).
FP_FUSION = True

# Measured on an H100 (bench/NOTES.md): the gemv kernel serves one row of activations (decode) by
# default: mm took M = 4 from the first sessions' multi-row gemv on 6 of 7 shapes, its cost barely grows
# with M <= 16. The gemv decodes a step once for all its rows, at one multiply-add per weight and row: the
# tuner times it up to GEMV_MAX_M rows (offline sm_90 compiles: ~5 SASS instructions a weight for one row,
# ~7.3 for two, ~11.4 for four, ~20 for eight). mm beats dequantize + cuBLAS up to M = 64 (M = 256 on some
# shapes). Used where no tuned plan covers the shape.
GEMV_MAX_M = 8
# The mma gemv computes 8 activation rows per mma (one tile), 16 with two tiles on the same decoded weights.
MMA_GEMV_MAX_M = 16
MM_MAX_M = 256
# CUDA's limit on grid axes 1 and 2 (axis 0 allows 2**31 - 1), and the largest element offset the
# kernels compute in int32 (activation and output rows; weight offsets are int64).
MAX_GRID_YZ = 65535
MAX_INT32_OFFSET = 2**31 - 1


@triton.jit
def _load_tile_parts(
    packed_ptr, absmax_ptr, nested_ptr, rows, row_mask, k0, K, stride_w,
    QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, GROUPS: tl.constexpr, SUB: tl.constexpr,
    EVEN: tl.constexpr, ROW_SCALES: tl.constexpr = False,
):
    """The codes of W[rows, k0 : k0 + GROUPS * SUB] as 32-bit words [len(rows), GROUPS, SUB // 8]
    (8 codes each, zero outside W) and what the scales of its groups [len(rows), GROUPS] are rebuilt
    from (load_scale_parts): every global load of a step, none depending on another.

    Needs K % QBLOCK == 0 (no quantization block spans two rows), so a group of SUB columns has one
    scale, loaded once per group rather than once per weight.

    ROW_SCALES (the gemv's "scales": "rows" plans) loads the scale parts in fewer global sectors: block
    indices written as contiguous along the groups (so Triton lays a row's 8-bit codes out together),
    and where the tiles divide W, one nested absmax per row ([rows, 1]: a step's groups are then inside
    one nested block of 256). On an H100 the gemv is bound by the L1's data-pipe wavefronts, a third of
    them from these loads (ncu, bench/NOTES.md).
    """
    # Loaded as a 2-D tile (16-byte loads, a thread's rows over the same columns, so that the
    # activations it converts serve all of them), then viewed per group.
    word_col = k0 // 8 + tl.arange(0, GROUPS * SUB // 8)
    word_ptr = packed_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None].to(tl.int64) * stride_w + word_col[None, :]
    words = masked_load(word_ptr, row_mask[:, None] & (word_col < K // 8)[None, :], 0, EVEN)
    g_col = k0 + tl.arange(0, GROUPS) * SUB
    mask = row_mask[:, None] & (g_col < K)[None, :]
    if ROW_SCALES:
        # GROUPS > 1 only where SUB == QBLOCK, so the step's blocks are consecutive.
        blk = rows[:, None] * (K // QBLOCK) + (k0 // QBLOCK + tl.arange(0, GROUPS) * (SUB // QBLOCK))[None, :]
    else:
        blk = rows[:, None] * (K // QBLOCK) + g_col[None, :] // QBLOCK
    if ROW_SCALES and DOUBLE_QUANT and EVEN:
        part = tl.load(absmax_ptr + blk).to(tl.int32)
        nested = tl.load(nested_ptr + (rows * (K // QBLOCK) + k0 // QBLOCK) // 256)[:, None]
    else:
        part, nested = load_scale_parts(absmax_ptr, nested_ptr, blk, mask, DOUBLE_QUANT, EVEN)
    return tl.reshape(words, [rows.shape[0], GROUPS, SUB // 8]), part, nested


@triton.jit
def _load_tile(
    packed_ptr, absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, rows, row_mask, k0, K, stride_w,
    QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, GROUPS: tl.constexpr, SUB: tl.constexpr,
    EVEN: tl.constexpr,
):
    """_load_tile_parts with the scales resolved: (words, fp32 scales)."""
    words, part, nested = _load_tile_parts(
        packed_ptr, absmax_ptr, nested_ptr, rows, row_mask, k0, K, stride_w, QBLOCK, DOUBLE_QUANT, GROUPS, SUB, EVEN,
    )
    return words, resolve_scales(part, nested, offset_ptr, dyn_ptr, DOUBLE_QUANT)


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


@triton.jit
def _decode_words(table, words, SHUFFLE: tl.constexpr, PAIRS: tl.constexpr):
    """The codebook values (fp32) of words [..] as [.., 8] in element order: by _decode of each code,
    or with PAIRS by pair_lookup of each byte (``table`` from codebook_pairs), joined in _codes' order."""
    if PAIRS:
        d0, d1, d2, d3, d4, d5, d6, d7 = pair_lookup(table, words)
        values = tl.join(tl.join(tl.join(d0, d4), tl.join(d2, d6)), tl.join(tl.join(d1, d5), tl.join(d3, d7)))
        return tl.reshape(values, [words.shape[0], words.shape[1], words.shape[2], 8])
    else:
        return _decode(table, _codes(words), SHUFFLE)


# gemv -------------------------------------------------------------------------------------------


@triton.jit
def _split8(t):
    """The slices t[..., 0], ..., t[..., 7] of a 4-D tensor whose last axis (8) lies within each thread:
    no data moves."""
    t = tl.reshape(t, [t.shape[0], t.shape[1], t.shape[2], 2, 2, 2])  # element e = 4 i + 2 j + k
    t_k0, t_k1 = tl.split(t)
    t0, t4 = tl.split(tl.split(t_k0)[0])
    t2, t6 = tl.split(tl.split(t_k0)[1])
    t1, t5 = tl.split(tl.split(t_k1)[0])
    t3, t7 = tl.split(tl.split(t_k1)[1])
    return t0, t1, t2, t3, t4, t5, t6, t7


@triton.jit
def _word_values(table, smem_table, words, SHUFFLE: tl.constexpr, MIXED: tl.constexpr, PAIRS: tl.constexpr):
    """The codebook values (fp32) of each word's 8 codes: words [R, G, W] -> 8 tensors [R, G, W], in element order.

    MIXED decodes the high nibbles from the shared-memory table (``smem_table``) and the low ones by
    shuffles (``table`` is the lane's entry), a plan the second session's model of the shared-memory
    pipe predicted faster (two cycles a shuffle, one a lookup); ncu later measured one wavefront for
    either (bench/NOTES.md), and it never won by more than noise. PAIRS: ``table`` from codebook_pairs."""
    if MIXED:
        high = lookup(smem_table, tl.join(tl.join(words >> 4, words >> 20), tl.join(words >> 12, words >> 28)))
        high_a, high_b = tl.split(high)
        d0, d4 = tl.split(high_a)
        d2, d6 = tl.split(high_b)
        d1 = shuffle_lookup(table, words)
        d3 = shuffle_lookup(table, words >> 8)
        d5 = shuffle_lookup(table, words >> 16)
        d7 = shuffle_lookup(table, words >> 24)
    else:
        d0, d1, d2, d3, d4, d5, d6, d7 = _split8(_decode_words(table, words, SHUFFLE, PAIRS))
    return d0, d1, d2, d3, d4, d5, d6, d7


@triton.jit
def _word_dots(values, x):
    """The dot product of each word's 8 values (_word_values) with x [G, W, 8] (fp32) -> [R, G, W]: one multiply
    and seven multiply-adds per word; tl.sum over the axis of 8 compiles to a tree of four multiplies, four
    multiply-adds and three adds."""
    d0, d1, d2, d3, d4, d5, d6, d7 = values
    x0, x1, x2, x3, x4, x5, x6, x7 = _split8(x[None, :, :, :])
    dots = d0 * x0
    dots += d1 * x1
    dots += d2 * x2
    dots += d3 * x3
    dots += d4 * x4
    dots += d5 * x5
    dots += d6 * x6
    dots += d7 * x7
    return dots


@triton.jit
def _add_scaled_dots(accs, table, smem_table, words, xs, scale, SHUFFLE: tl.constexpr, MIXED: tl.constexpr,
                     PAIRS: tl.constexpr):
    """accs[r] + the dots of the words with xs[r] times each group's scale, for each activation row r: the
    words are decoded once for all rows. A tuple of per-row accumulators, not one tensor with a rows axis:
    Triton lays a [R, G, W, rows] accumulator out unlike the decoded [R, G, W] words and converts every
    decoded value through shared memory each step (offline sm_90 compiles)."""
    values = _word_values(table, smem_table, words, SHUFFLE, MIXED, PAIRS)
    new_accs = ()
    for r in tl.static_range(len(accs)):
        new_accs = new_accs + (accs[r] + _word_dots(values, xs[r].to(tl.float32)) * scale[:, :, None],)
    return new_accs


@triton.jit
def _load_x_rows(x_ptr, x_col, mask, M, stride_xm, ROWS: tl.constexpr, EVEN: tl.constexpr):
    """The tiles x[r, x_col] of activation rows 0 .. ROWS - 1 (a tuple); rows past M read row M - 1 again, so
    that no row needs a mask (their outputs are not stored)."""
    xs = ()
    for r in tl.static_range(ROWS):
        row_ptr = x_ptr if r == 0 else x_ptr + tl.minimum(r, M - 1) * stride_xm
        xs = xs + (masked_load(row_ptr + x_col, mask, 0.0, EVEN),)
    return xs


@triton.jit
def _write_out(ptrs, value, mask, SPLIT_K: tl.constexpr):
    """A kernel's fp32 result into the output at ``ptrs``: stored in the output's dtype, or with split-K added
    (relaxed atomics) into the zeroed fp32 buffer that _output gives it."""
    if SPLIT_K == 1:
        tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, value, mask=mask, sem="relaxed")


@triton.jit
def _sibling_weight(
    tile, BLOCK: tl.constexpr, N, N1, N2, WEIGHTS: tl.constexpr,
    packed_ptr, absmax_ptr, nested_ptr, offset_ptr, bias_ptr,
    packed1_ptr, absmax1_ptr, nested1_ptr, offset1_ptr, bias1_ptr,
    packed2_ptr, absmax2_ptr, nested2_ptr, offset2_ptr, bias2_ptr,
):
    """Where W is the row-concatenation of WEIGHTS (1, 2 or 3) NF4 weights of K columns (sibling linears of one input,
    e.g. q, k and v): the first cdiv(N, BLOCK) tiles of BLOCK output rows are the first weight's, the next ones
    the second's. Returns the tile's index within its weight, the weight's first output row, its row count
    (with siblings a tensor, even where Triton made N a constant) and its pointers."""
    # Only static ifs keep the empty slots out: Triton 3.6 type-checks the statements after a static early return,
    # and an empty slot's pointers (whatever _sibling_args put there) need not have the first weight's types.
    out_row0 = 0
    n_rows = N
    if WEIGHTS > 1:
        out_row0 = tile * 0
        n_rows = N + out_row0
        if tile >= tl.cdiv(N, BLOCK):
            tile -= tl.cdiv(N, BLOCK)
            out_row0 += N
            n_rows = N1 + tile * 0
            packed_ptr, absmax_ptr, nested_ptr, offset_ptr, bias_ptr = packed1_ptr, absmax1_ptr, nested1_ptr, offset1_ptr, bias1_ptr
            if WEIGHTS > 2:
                if tile >= tl.cdiv(N1, BLOCK):
                    tile -= tl.cdiv(N1, BLOCK)
                    out_row0 += N1
                    n_rows = N2 + tile * 0
                    packed_ptr, absmax_ptr, nested_ptr, offset_ptr, bias_ptr = packed2_ptr, absmax2_ptr, nested2_ptr, offset2_ptr, bias2_ptr
    return tile, out_row0, n_rows, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, bias_ptr


@triton.jit
def _nf4_gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, dyn_ptr, pair_ptr, bias_ptr, out_ptr,
    M, N, K, stride_w, stride_xm, stride_om,
    packed1_ptr, absmax1_ptr, nested1_ptr, offset1_ptr, bias1_ptr, N1,
    packed2_ptr, absmax2_ptr, nested2_ptr, offset2_ptr, bias2_ptr, N2,
    QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, SUB: tl.constexpr,
    SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr, EVEN: tl.constexpr, SHUFFLE: tl.constexpr,
    MIXED: tl.constexpr, PAIRS: tl.constexpr, PREFETCH: tl.constexpr, ROW_SCALES: tl.constexpr, WEIGHTS: tl.constexpr,
):
    # x [M, K] @ W.T for M <= ROWS rows of activations: a program owns BLOCK_N rows of W and one of SPLIT_K
    # slices of K, streams that slice in steps of BLOCK_K columns and decodes each step once for all M rows.
    # With WEIGHTS = 2 or 3, W is that many weights (_sibling_weight), side by side in each output row
    # [N + N1 + N2].
    BLOCK_K: tl.constexpr = GROUPS * SUB
    WORDS: tl.constexpr = SUB // 8
    pid_k = tl.program_id(1)
    tile, out_row0, n_rows, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, bias_ptr = _sibling_weight(
        tl.program_id(0), BLOCK_N, N, N1, N2, WEIGHTS, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, bias_ptr,
        packed1_ptr, absmax1_ptr, nested1_ptr, offset1_ptr, bias1_ptr,
        packed2_ptr, absmax2_ptr, nested2_ptr, offset2_ptr, bias2_ptr,
    )
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    g_col = tl.arange(0, GROUPS) * SUB
    x_col = g_col[:, None, None] + tl.arange(0, WORDS)[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if PAIRS:
        table = codebook_pairs(pair_ptr)
    else:
        table = _codebook(code_ptr, SHUFFLE)
    smem_table = _codebook(code_ptr, False)  # read by MIXED lookups only
    # Partial sums per word, reduced across threads once after the loop, not every step. Scales
    # multiply each word's dot product, not each weight.
    accs = ()
    for r in tl.static_range(ROWS):
        accs = accs + (tl.zeros([BLOCK_N, GROUPS, WORDS], dtype=tl.float32),)
    if PREFETCH:
        # Double buffering in registers: the next step's loads are issued before this step decodes,
        # so every thread keeps a step of HBM reads in flight while it computes, without staging
        # through shared memory (whose pipe the lookups use). Where the tiles divide W (EVEN: no
        # masks) the last step re-reads its own tile instead of reading past W.
        k_last = (K // BLOCK_K - 1) * BLOCK_K if EVEN else K  # a multiple of BLOCK_K: 16-byte loads
        k_first = tl.minimum(k_start, k_last)
        if ROW_SCALES:
            dyn_table = tl.load(dyn_ptr + tl.arange(0, 256))
        else:
            dyn_table = None
        words, part, nested = _load_tile_parts(
            packed_ptr, absmax_ptr, nested_ptr, rows, row_mask, k_first, K, stride_w, QBLOCK, DOUBLE_QUANT, GROUPS, SUB,
            EVEN, ROW_SCALES,
        )
        xs = _load_x_rows(x_ptr + k_first, x_col, (k_first + g_col < K)[:, None, None], M, stride_xm, ROWS, EVEN)
        for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=1):
            k_next = tl.minimum(k0 + BLOCK_K, k_last)
            next_words, next_part, next_nested = _load_tile_parts(
                packed_ptr, absmax_ptr, nested_ptr, rows, row_mask, k_next, K, stride_w, QBLOCK, DOUBLE_QUANT, GROUPS,
                SUB, EVEN, ROW_SCALES,
            )
            next_xs = _load_x_rows(x_ptr + k_next, x_col, (k_next + g_col < K)[:, None, None], M, stride_xm, ROWS, EVEN)
            scale = resolve_scales(part, nested, offset_ptr, dyn_ptr, DOUBLE_QUANT, dyn_table)
            accs = _add_scaled_dots(accs, table, smem_table, words, xs, scale, SHUFFLE, MIXED, PAIRS)
            words, part, nested, xs = next_words, next_part, next_nested, next_xs
    else:
        # Pipelined explicitly: Triton only pipelines loops with a tl.dot by itself.
        for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
            words, scale = _load_tile(
                packed_ptr, absmax_ptr, nested_ptr, offset_ptr, dyn_ptr,
                rows, row_mask, k0, K, stride_w, QBLOCK, DOUBLE_QUANT, GROUPS, SUB, EVEN,
            )
            xs = _load_x_rows(x_ptr + k0, x_col, (k0 + g_col < K)[:, None, None], M, stride_xm, ROWS, EVEN)
            accs = _add_scaled_dots(accs, table, smem_table, words, xs, scale, SHUFFLE, MIXED, PAIRS)
    if HAS_BIAS:
        bias = tl.where(pid_k == 0, tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32), 0.0)
    for r in tl.static_range(ROWS):
        out = tl.sum(tl.sum(accs[r], axis=2), axis=1)
        if HAS_BIAS:
            out += bias
        out_mask = row_mask if r == 0 else row_mask & (rows * 0 + r < M)  # M >= 1
        _write_out(out_ptr + r * stride_om + out_row0 + rows, out, out_mask, SPLIT_K)


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
    # "prefetch": the next step's codes loaded into registers while this one decodes (a step of loads
    # always in flight per thread, for 16-32 more registers). "mixed": half the codes by shuffles, half
    # from shared memory (see _word_dots). "pairs": two codes per shared-memory read from a per-lane copy
    # of the fp16 pair table (codebook_pairs), half the data-pipe wavefronts of the shuffles. Every
    # prefetch tile with each lookup.
    *[dict(tile, num_stages=1, lookup=lookup, prefetch=True) for lookup in ("shuffle", "mixed", "pairs") for tile in (
        dict(BLOCK_N=16, BLOCK_K=512, SPLIT_K=1, num_warps=4),
        dict(BLOCK_N=32, BLOCK_K=256, SPLIT_K=1, num_warps=4),
        dict(BLOCK_N=32, BLOCK_K=512, SPLIT_K=1, num_warps=8),
        dict(BLOCK_N=16, BLOCK_K=1024, SPLIT_K=1, num_warps=8),
        dict(BLOCK_N=16, BLOCK_K=512, SPLIT_K=2, num_warps=4),
    )],
    dict(BLOCK_N=16, BLOCK_K=512, SPLIT_K=1, num_warps=4, num_stages=1, prefetch=True),
    dict(BLOCK_N=16, BLOCK_K=512, SPLIT_K=1, num_warps=4, num_stages=1, lookup="mixed"),
    dict(BLOCK_N=16, BLOCK_K=1024, SPLIT_K=2, num_warps=8, num_stages=1, lookup="mixed", prefetch=True),
    dict(BLOCK_N=64, BLOCK_K=256, SPLIT_K=1, num_warps=8, num_stages=1, lookup="pairs", prefetch=True),
    # "maxnreg": 64 caps the registers (80-95 otherwise; offline, 16-32 bytes spill to local memory) so that four
    # programs of 8 warps fit an SM, or six of 4 (the table's shared memory limits those): ncu found the pairs GEMV
    # bound by latency at three programs of 8 warps (bench/NOTES.md). On the H100 they won only the q/k/v group of
    # Llama-2-7B (16.84 vs 17.12 us) and lost 1-23% on the seven shapes (thirteenth session).
    *[dict(tile, num_stages=1, lookup="pairs", prefetch=True, maxnreg=64) for tile in (
        dict(BLOCK_N=32, BLOCK_K=512, SPLIT_K=1, num_warps=8, scales="rows"),
        dict(BLOCK_N=32, BLOCK_K=512, SPLIT_K=1, num_warps=8),
        dict(BLOCK_N=16, BLOCK_K=512, SPLIT_K=1, num_warps=4),
        dict(BLOCK_N=16, BLOCK_K=1024, SPLIT_K=1, num_warps=8),
    )],
    # "scales": "rows": the scale parts loaded in fewer global sectors and the dynamic map read from shared
    # memory (_load_tile_parts): ~16% fewer L1 data-pipe wavefronts at 32x512, the tile it suits (ncu).
    *[dict(tile, num_stages=1, lookup=lookup, prefetch=True, scales="rows") for lookup in ("shuffle", "pairs") for tile in (
        dict(BLOCK_N=16, BLOCK_K=512, SPLIT_K=1, num_warps=4),
        dict(BLOCK_N=32, BLOCK_K=512, SPLIT_K=1, num_warps=8),
        dict(BLOCK_N=16, BLOCK_K=1024, SPLIT_K=1, num_warps=8),
    )],
]


# Several rows of activations: the prefetching tiles (each thread holds every row's partial sums, 1-4 weight
# rows a thread, the most registers where rows are many), both lookups, and split-K for small N.
GEMV_ROWS_CONFIGS = [
    *[dict(tile, num_stages=1, lookup=lookup, prefetch=True) for lookup in ("shuffle", "pairs") for tile in (
        dict(BLOCK_N=16, BLOCK_K=512, SPLIT_K=1, num_warps=4),
        dict(BLOCK_N=32, BLOCK_K=256, SPLIT_K=1, num_warps=4),
        dict(BLOCK_N=32, BLOCK_K=512, SPLIT_K=1, num_warps=8),
        dict(BLOCK_N=64, BLOCK_K=256, SPLIT_K=1, num_warps=8),
    )],
    dict(BLOCK_N=16, BLOCK_K=512, SPLIT_K=2, num_warps=4, num_stages=1, lookup="pairs", prefetch=True),
]


def nf4_gemv(x2, packed, absmax, nested_absmax, offset, block_size, N, K, bias, config, siblings=()):
    """Launch wrapper: x2 [M, K] @ W.T (+ bias) -> [M, N] in x2.dtype, M <= GEMV_MAX_M. ``siblings``: up to
    two more weights of K columns, each (packed, absmax, nested_absmax, offset, rows, bias) in W's scale format
    and with a bias where W has one, whose outputs follow W's in each row [M, N + rows1 + rows2]."""
    M = x2.shape[0]
    assert 1 <= M <= GEMV_MAX_M, f"the gemv kernel serves 1 to {GEMV_MAX_M} rows of activations"
    assert len(siblings) <= 2, "the gemv kernel reads at most three weights"
    split_k, block_n = config["SPLIT_K"], config["BLOCK_N"]
    row_counts = (N, *(w[4] for w in siblings))
    out = _output(M, sum(row_counts), x2, split_k)
    code, dyn, pairs, _ = lookup_tables(x2.device)
    shuffle, mixed, use_pairs = _lookups(config, x2.dtype)
    sub = min(config["BLOCK_K"], block_size)
    grid = (sum(-(-n // block_n) for n in row_counts), split_k)
    _nf4_gemv_kernel[grid](
        x2, packed, absmax, *_nested_args(absmax, nested_absmax, offset), code, dyn, pairs,
        bias if bias is not None else out, out, M, N, K, K // 8, x2.stride(0), out.stride(0),
        *_sibling_args(siblings, packed, absmax, out),
        QBLOCK=block_size, DOUBLE_QUANT=nested_absmax is not None, HAS_BIAS=bias is not None,
        ROWS=triton.next_power_of_2(M), BLOCK_N=block_n, GROUPS=config["BLOCK_K"] // sub, SUB=sub, SPLIT_K=split_k, NUM_STAGES=config["num_stages"],
        EVEN=all(n % block_n == 0 for n in row_counts) and K % config["BLOCK_K"] == 0,
        SHUFFLE=shuffle, MIXED=mixed, PAIRS=use_pairs,
        PREFETCH=config.get("prefetch", False), ROW_SCALES=config.get("scales") == "rows",
        WEIGHTS=1 + len(siblings), num_warps=config["num_warps"], enable_fp_fusion=FP_FUSION,
        **({"maxnreg": config["maxnreg"]} if "maxnreg" in config else {}),  # other plans launch as measured
    )
    return out if split_k == 1 else out.to(x2.dtype)


# mma gemv ---------------------------------------------------------------------------------------


def _mma_chunk_ptx(operand: str, tiles: int) -> str:
    """PTX of _mma_chunk for ``operand`` ("bf16" or "f16") and 1 or 2 ``tiles`` of 8 activation rows: 16 pair lookups
    (codebook_pairs' table) straight into the A registers of four mma.sync.m16n8k16 a tile, whose fp32 sums over the
    chunk come out in the first 4 * tiles operands. Then: rows g's two words, row g + 8's two, each tile's activation
    row (g, then g + 8) as 8 words, the lane's offset into the table."""
    words, xs = 4 * tiles, 4 * tiles + 4
    lane = xs + 8 * tiles
    lines = ["{", ".reg .b32 t, q, a<16>;", ".reg .f32 z;", "mov.u32 t, nf4_pairs;", "mov.f32 z, 0f00000000;"]
    for step in range(4):
        # a0 .. a3 of k-step `step`: rows g and g + 8 at byte 2 step, then both at byte 2 step + 1.
        for slot, (word, byte) in enumerate([(words, 2 * step), (words + 2, 2 * step), (words, 2 * step + 1),
                                             (words + 2, 2 * step + 1)]):
            shift, bits = PAIR_BYTE_SHIFTS[byte % 4]
            lines += [f"{shift} q, ${word + byte // 4}, {bits};", "and.b32 q, q, 32640;", f"or.b32 q, q, ${lane};",
                      "add.u32 q, q, t;", f"ld.shared.b32 a{4 * step + slot}, [q];"]
    for tile in range(tiles):
        out = ", ".join(f"${4 * tile + i}" for i in range(4))
        for step in range(4):
            acc = "{z, z, z, z}" if step == 0 else f"{{{out}}}"
            b = xs + 8 * tile + 2 * step
            lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{operand}.{operand}.f32 {{{out}}}, "
                         f"{{a{4 * step}, a{4 * step + 1}, a{4 * step + 2}, a{4 * step + 3}}}, {{${b}, ${b + 1}}}, {acc};")
    return "\n\t".join(lines + ["}"])


_MMA_CHUNK_PTX_BF16 = tl.constexpr(_mma_chunk_ptx("bf16", 1))
_MMA_CHUNK_PTX_F16 = tl.constexpr(_mma_chunk_ptx("f16", 1))
_MMA_CHUNK_PTX_BF16_2 = tl.constexpr(_mma_chunk_ptx("bf16", 2))
_MMA_CHUNK_PTX_F16_2 = tl.constexpr(_mma_chunk_ptx("f16", 2))
# Its operands' constraints: 4 fp32 results a tile, then 32-bit words (4 of weights, 8 a tile, the lane's offset).
_MMA_CHUNK_CONSTRAINTS = tl.constexpr(",".join(["=f"] * 4 + ["r"] * 13))
_MMA_CHUNK_CONSTRAINTS_2 = tl.constexpr(",".join(["=f"] * 8 + ["r"] * 21))


@triton.jit
def _emulated_mma(c, a, b0, b1, thread, BF16: tl.constexpr):
    """Interpreter: one mma.sync.m16n8k16 (fp32 += 16-bit A [16, 16] @ B [16, 8]) of every warp, from the lanes'
    fragments as the PTX ISA lays them out (lane = 4 g + tq: a0 = A[g, 2tq : 2tq + 2], a1 = A[g + 8, 2tq : ..],
    a2, a3 the same at columns 2tq + 8; b0 = B[2tq : 2tq + 2, g], b1 at rows 2tq + 8; c0, c1 = C[g, 2tq : 2tq + 2],
    c2, c3 = C[g + 8, ..]), each lane reading the others' registers by gathers."""
    c0, c1, c2, c3 = c
    lane = thread % 32
    warp_lane0 = thread - lane
    for t in tl.static_range(4):
        src_a = warp_lane0 + (lane // 4) * 4 + t  # the lanes holding rows g and g + 8
        src_b = warp_lane0 + (lane % 4) * 8 + t  # the lanes holding column 2tq (column 2tq + 1: 4 lanes on)
        a0l, a0h = pair_values(tl.gather(a[0], src_a, 0), BF16)
        a1l, a1h = pair_values(tl.gather(a[1], src_a, 0), BF16)
        a2l, a2h = pair_values(tl.gather(a[2], src_a, 0), BF16)
        a3l, a3h = pair_values(tl.gather(a[3], src_a, 0), BF16)
        for n in tl.static_range(2):
            b0l, b0h = pair_values(tl.gather(b0, src_b + 4 * n, 0), BF16)
            b1l, b1h = pair_values(tl.gather(b1, src_b + 4 * n, 0), BF16)
            upper = a0l * b0l + a0h * b0h + a2l * b1l + a2h * b1h
            lower = a1l * b0l + a1h * b0h + a3l * b1l + a3h * b1h
            if n == 0:
                c0 += upper
                c2 += lower
            else:
                c1 += upper
                c3 += lower
    return c0, c1, c2, c3


@triton.jit
def _mma_chunk(table, words_g, words_h, xs, thread, BF16: tl.constexpr, ROW_TILES: tl.constexpr):
    """This lane's share of out^T[16 rows, 8 activation rows] (of each of ROW_TILES tiles of 8) over one 64-column
    chunk: four m16n8k16 mma a tile whose A fragments are the lane's weights decoded by pair lookups (byte 2s of
    rows g and g + 8, then byte 2s + 1, in k-step s), whose B fragments are its activations (words 2s and 2s + 1 of
    each tile's 8 in ``xs``) -> 4 * ROW_TILES values (c0, c1, c2, c3 of each tile)."""
    if INTERPRET:
        a = ()  # the four k-steps' A fragments, decoded once for every tile as the PTX does
        for step in tl.static_range(4):
            word = step // 2
            shift = 16 * (step % 2)
            a = a + ((gather_table(table, (words_g[word] >> shift) & 0xFF),
                      gather_table(table, (words_h[word] >> shift) & 0xFF),
                      gather_table(table, (words_g[word] >> (shift + 8)) & 0xFF),
                      gather_table(table, (words_h[word] >> (shift + 8)) & 0xFF)),)
        zeros = tl.zeros(thread.shape, tl.float32)
        out = ()
        for tile in tl.static_range(ROW_TILES):
            c = (zeros, zeros, zeros, zeros)
            for step in tl.static_range(4):
                c = _emulated_mma(c, a[step], xs[8 * tile + 2 * step], xs[8 * tile + 2 * step + 1], thread, BF16)
            out = out + c
        return out
    elif ROW_TILES == 1:
        return tl.inline_asm_elementwise(
            _MMA_CHUNK_PTX_BF16 if BF16 else _MMA_CHUNK_PTX_F16, _MMA_CHUNK_CONSTRAINTS,
            [words_g[0], words_g[1], words_h[0], words_h[1], xs[0], xs[1], xs[2], xs[3], xs[4], xs[5], xs[6], xs[7], table],
            dtype=(tl.float32,) * 4, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(
            _MMA_CHUNK_PTX_BF16_2 if BF16 else _MMA_CHUNK_PTX_F16_2, _MMA_CHUNK_CONSTRAINTS_2,
            [words_g[0], words_g[1], words_h[0], words_h[1], xs[0], xs[1], xs[2], xs[3], xs[4], xs[5], xs[6], xs[7],
             xs[8], xs[9], xs[10], xs[11], xs[12], xs[13], xs[14], xs[15], table],
            dtype=(tl.float32,) * 8, is_pure=True, pack=1)


@triton.jit
def _load_words(ptr, COUNT: tl.constexpr):
    """COUNT (2 or 4) consecutive 32-bit words at ``ptr`` (a thread's own address; 4 * COUNT-byte aligned), in one
    non-coherent vector load: Triton cannot vectorize addresses that only the lane id orders."""
    if INTERPRET:
        words = ()
        for i in tl.static_range(COUNT):
            words = words + (tl.load(ptr + i),)
        return words
    elif COUNT == 2:
        return tl.inline_asm_elementwise("ld.global.nc.v2.b32 {$0, $1}, [$2];", "=r,=r,l", [ptr],
                                         dtype=(tl.int32,) * 2, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise("ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", [ptr],
                                         dtype=(tl.int32,) * 4, is_pure=True, pack=1)


@triton.jit
def _load_mma_chunk(w_rows, x_row, x_row2, absmax_ptr, nested_ptr, blks, chunk, QBLOCK: tl.constexpr,
                    DOUBLE_QUANT: tl.constexpr, ROWS: tl.constexpr, ROW_TILES: tl.constexpr, SCALES: tl.constexpr):
    """Every global load of a chunk of 64 columns (none depending on another): the lane's 8 bytes of each of its ROWS
    weight rows (two words each), its 16 activations of each tile (8 words, from x_row and x_row2) and, if SCALES, the
    rows' scale parts."""
    words = ()
    for r in tl.static_range(ROWS):
        words = words + (_load_words(w_rows[r] + chunk * 8, 2),)
    xs = _load_words(x_row + chunk * 32, 4) + _load_words(x_row + chunk * 32 + 4, 4)
    if ROW_TILES == 2:
        xs = xs + _load_words(x_row2 + chunk * 32, 4) + _load_words(x_row2 + chunk * 32 + 4, 4)
    loads = (words, xs)
    if SCALES:
        loads = loads + (_chunk_scale_parts(absmax_ptr, nested_ptr, blks, chunk, QBLOCK, DOUBLE_QUANT, ROWS),)
    return loads


@triton.jit
def _chunk_scale_parts(absmax_ptr, nested_ptr, blks, chunk, QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                       ROWS: tl.constexpr):
    """load_scale_parts of the lane's ROWS weight rows (first blocks ``blks``) for a chunk of 64 columns."""
    parts = ()
    for r in tl.static_range(ROWS):
        parts = parts + (load_scale_parts(absmax_ptr, nested_ptr, blks[r] + chunk * 64 // QBLOCK, None, DOUBLE_QUANT,
                                          True),)
    return parts


@triton.jit
def _chunk_scales(parts, offset_ptr, dyn_ptr, DOUBLE_QUANT: tl.constexpr, ROWS: tl.constexpr):
    """The fp32 scales of the lane's ROWS weight rows from _chunk_scale_parts' values."""
    scales = ()
    for r in tl.static_range(ROWS):
        scales = scales + (resolve_scales(parts[r][0], parts[r][1], offset_ptr, dyn_ptr, DOUBLE_QUANT),)
    return scales


@triton.jit
def _load_mma_step(w_rows, x_row, x_row2, absmax_ptr, nested_ptr, blks, chunk, last, QBLOCK: tl.constexpr,
                   DOUBLE_QUANT: tl.constexpr, ROWS: tl.constexpr, ROW_TILES: tl.constexpr, CHUNKS: tl.constexpr,
                   SCALES: tl.constexpr):
    """_load_mma_chunk of chunks chunk .. chunk + CHUNKS - 1, those past ``last`` reading ``last`` again."""
    loads = ()
    for i in tl.static_range(CHUNKS):
        loads = loads + (_load_mma_chunk(w_rows, x_row, x_row2, absmax_ptr, nested_ptr, blks,
                                         tl.minimum(chunk + i, last), QBLOCK, DOUBLE_QUANT, ROWS, ROW_TILES, SCALES),)
    return loads


@triton.jit
def _quad_scales(absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, blks, chunk, last, tq, QBLOCK: tl.constexpr,
                 DOUBLE_QUANT: tl.constexpr, ROWS: tl.constexpr):
    """The scales of the lane's ROWS weight rows for chunk ``chunk + tq`` (at most ``last``): the four lanes of a quad,
    which share their rows, resolve one chunk each of the next four."""
    parts = _chunk_scale_parts(absmax_ptr, nested_ptr, blks, tl.minimum(chunk + tq, last), QBLOCK, DOUBLE_QUANT, ROWS)
    return _chunk_scales(parts, offset_ptr, dyn_ptr, DOUBLE_QUANT, ROWS)


@triton.jit
def _from_quad_lane(value, i, thread):
    """``value`` of lane i of this lane's quad (lanes 4 (lane // 4) .. + 3): a shuffle within segments of 4 lanes."""
    if INTERPRET:
        return tl.gather(value, thread - thread % 4 + i, 0)
    else:
        return tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x1c1f, 0xffffffff;", "=f,f,r",
                                         [value, thread * 0 + i], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _nf4_mma_gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, pair_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om,
    packed1_ptr, absmax1_ptr, nested1_ptr, offset1_ptr, bias1_ptr, N1,
    packed2_ptr, absmax2_ptr, nested2_ptr, offset2_ptr, bias2_ptr, N2,
    QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, WARPS: tl.constexpr,
    SPLIT_K: tl.constexpr, CHUNKS: tl.constexpr, QUAD_SCALES: tl.constexpr, ROW_TILES: tl.constexpr,
    WEIGHT_TILES: tl.constexpr, BF16: tl.constexpr, WEIGHTS: tl.constexpr,
):
    # x [M <= 8 * ROW_TILES, K] @ W.T on the tensor cores, swapped (out^T = W @ x^T): each warp owns WEIGHT_TILES
    # tiles of 16 rows of W, a program WARPS times that and one of SPLIT_K slices of K. Each thread is one lane of
    # mma.sync.m16n8k16: g = lane // 4 names its two weight rows of each tile (g, g + 8 of its 16) and its activation
    # row in each tile of 8 (g, then 8 + g; rows past M repeat row M - 1, their outputs not stored), tq = lane % 4 its
    # 16 of each 64 columns. Both activation tiles' mma take the same A fragments: a second tile costs its
    # activations' loads and four mma a chunk. Both weight tiles' mma take the same B fragments: a second weight tile
    # halves the activations' loads per weight byte, which the L1 moves for every warp alike.
    # The reduction order within a chunk of 64 columns is permuted, alike for both operands: lane tq's A and B
    # fragments hold columns 16 tq .. 16 tq + 15, which are 8 contiguous bytes of each weight row and 32 of
    # activations, decoded straight into the A registers (no shared-memory round trip, no layout conversion). The
    # block scale multiplies each chunk's fp32 result (QBLOCK >= 64: a chunk lies in one block).
    pid_k = tl.program_id(1)
    tile, out_row0, n_rows, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, bias_ptr = _sibling_weight(
        tl.program_id(0), WARPS * 16 * WEIGHT_TILES, N, N1, N2, WEIGHTS,
        packed_ptr, absmax_ptr, nested_ptr, offset_ptr, bias_ptr,
        packed1_ptr, absmax1_ptr, nested1_ptr, offset1_ptr, bias1_ptr,
        packed2_ptr, absmax2_ptr, nested2_ptr, offset2_ptr, bias2_ptr,
    )
    thread = tl.arange(0, 32 * WARPS)  # one element a thread: Triton's default layout for this shape
    lane = thread % 32
    tq = lane % 4
    # The lane's weight rows: g and g + 8 of each of the warp's tiles of 16.
    warp_row0 = tile * (WARPS * 16 * WEIGHT_TILES) + (thread // 32) * (16 * WEIGHT_TILES) + lane // 4
    words_ptr = packed_ptr.to(tl.pointer_type(tl.int32))
    rows, reads, w_rows, blks = (), (), (), ()
    for r in tl.static_range(2 * WEIGHT_TILES):
        row = warp_row0 + 8 * r
        read = tl.minimum(row, n_rows - 1)  # rows past W read its last row, never stored
        rows = rows + (row,)
        reads = reads + (read,)
        w_rows = w_rows + (words_ptr + read.to(tl.int64) * (K // 8) + tq * 2,)
        blks = blks + (read * (K // QBLOCK),)
    x_words = x_ptr.to(tl.pointer_type(tl.int32))
    x_row = x_words + tl.minimum(lane // 4, M - 1) * (stride_xm // 2) + tq * 8
    x_row2 = x_words + tl.minimum(lane // 4 + 8, M - 1) * (stride_xm // 2) + tq * 8
    chunks = K // 64
    per_split = tl.cdiv(chunks, SPLIT_K)
    c_start = pid_k * per_split
    c_end = tl.minimum(c_start + per_split, chunks)
    table = codebook_pairs(pair_ptr)
    # Per weight tile, per activation tile the lane's four outputs: (row g, activation 2 tq), (g, 2 tq + 1),
    # (g + 8, 2 tq), (g + 8, 2 tq + 1).
    accs = ()
    for wt in tl.static_range(WEIGHT_TILES):
        tile_accs = ()
        for i in tl.static_range(4 * ROW_TILES):
            tile_accs = tile_accs + (tl.zeros([32 * WARPS], dtype=tl.float32),)
        accs = accs + (tile_accs,)
    # Double buffering in registers, as the gemv's prefetch: the next step's loads (CHUNKS chunks) are issued before
    # this step's lookups and mma. A step's chunks past the slice re-read its last one and add nothing.
    # QUAD_SCALES: every lane loads the scale parts of all its chunks, which makes them most of the sectors the L1
    # moves, the kernel's bound (bench/NOTES.md, sixteenth session); instead each iteration covers four chunks whose
    # scales the lanes of a quad resolve one each (a quarter of the scale loads) and hand out by shuffles.
    last = c_end - 1  # >= 0: every slice ends at a chunk of W, empty ones included
    loads = _load_mma_step(w_rows, x_row, x_row2, absmax_ptr, nested_ptr, blks, c_start, last, QBLOCK, DOUBLE_QUANT,
                           2 * WEIGHT_TILES, ROW_TILES, CHUNKS, not QUAD_SCALES)
    for chunk in tl.range(c_start, c_end, 4 if QUAD_SCALES else CHUNKS, num_stages=1):
        if QUAD_SCALES:
            quad = _quad_scales(absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, blks, chunk, last, tq, QBLOCK,
                                DOUBLE_QUANT, 2 * WEIGHT_TILES)
        for step in tl.static_range(0, 4 if QUAD_SCALES else CHUNKS, CHUNKS):
            next_loads = _load_mma_step(w_rows, x_row, x_row2, absmax_ptr, nested_ptr, blks, chunk + step + CHUNKS,
                                        last, QBLOCK, DOUBLE_QUANT, 2 * WEIGHT_TILES, ROW_TILES, CHUNKS,
                                        not QUAD_SCALES)
            for i in tl.static_range(CHUNKS):
                words, xs = loads[i][0], loads[i][1]
                cs = ()
                for wt in tl.static_range(WEIGHT_TILES):
                    cs = cs + (_mma_chunk(table, words[2 * wt], words[2 * wt + 1], xs, thread, BF16, ROW_TILES),)
                if QUAD_SCALES:
                    scales = ()
                    for r in tl.static_range(2 * WEIGHT_TILES):
                        scales = scales + (_from_quad_lane(quad[r], step + i, thread),)
                else:
                    scales = _chunk_scales(loads[i][2], offset_ptr, dyn_ptr, DOUBLE_QUANT, 2 * WEIGHT_TILES)
                new_accs = ()
                for wt in tl.static_range(WEIGHT_TILES):
                    tile_accs = ()
                    for j in tl.static_range(4 * ROW_TILES):
                        c = cs[wt][j]
                        if step + i > 0:
                            c = tl.where(chunk + step + i < c_end, c, 0.0)
                        tile_accs = tile_accs + (accs[wt][j] + c * scales[2 * wt + j % 4 // 2],)
                    new_accs = new_accs + (tile_accs,)
                accs = new_accs
            loads = next_loads
    if HAS_BIAS:
        biases = ()
        for r in tl.static_range(2 * WEIGHT_TILES):
            biases = biases + (tl.where(pid_k == 0, tl.load(bias_ptr + reads[r]).to(tl.float32), 0.0),)
    for wt in tl.static_range(WEIGHT_TILES):
        for j in tl.static_range(4 * ROW_TILES):
            row = rows[2 * wt + j % 4 // 2]
            act = 8 * (j // 4) + tq * 2 + j % 2
            value = accs[wt][j]
            if HAS_BIAS:
                value += biases[2 * wt + j % 4 // 2]
            _write_out(out_ptr + act * stride_om + (out_row0 + row), value, (row < n_rows) & (act < M), SPLIT_K)


# Warps per program (16 weight rows each; the 32 KB pair table limits an SM to 7 programs), split-K, and chunks of
# 64 columns a step (2: twice the loads in flight, the addresses' arithmetic shared). Split-K 3 fills the last wave
# where 2 and 4 do not (11008x4096 at M = 4: 18.7 us against the 8-warp split 4 plan's 21.0; 5, 6 and 7 won no shape,
# bench/NOTES.md).
# "scales": "quad" (QUAD_SCALES) loads a quarter of the scale parts (built after the sixteenth session's device
# time); "WEIGHT_TILES": 2 halves the activations' loads per weight byte, with quad scales and one chunk a step
# (71 registers for 8 warps offline, 106 with two activation tiles; two chunks a step: 89). Neither has been timed
# on a GPU (no device was lent in the seventeenth session): offered to the tuner, chosen by no shipped plan.
MMA_GEMV_CONFIGS = [dict(num_warps=warps, SPLIT_K=split_k, CHUNKS=chunks, **scales)
                    for scales in ({}, {"scales": "quad"}) for chunks in (1, 2) for warps in (4, 8)
                    for split_k in (1, 2, 3, 4, 8)]
MMA_GEMV_CONFIGS += [dict(num_warps=warps, SPLIT_K=split_k, CHUNKS=1, scales="quad", WEIGHT_TILES=2)
                     for warps in (4, 8) for split_k in (1, 2, 3, 4, 8)]


def nf4_mma_gemv(x2, packed, absmax, nested_absmax, offset, block_size, N, K, bias, config, siblings=()):
    """Launch wrapper: x2 [M <= MMA_GEMV_MAX_M, K] @ W.T (+ bias) -> [M, N] in x2.dtype (bf16 or fp16) on the tensor
    cores; kernel_can_serve states what it needs. ``siblings`` as for nf4_gemv."""
    M = x2.shape[0]
    assert 1 <= M <= MMA_GEMV_MAX_M and len(siblings) <= 2
    split_k, warps = config["SPLIT_K"], config["num_warps"]
    row_counts = (N, *(w[4] for w in siblings))
    out = _output(M, sum(row_counts), x2, split_k)
    _, dyn, fp16_pairs, bf16_pairs = lookup_tables(x2.device)
    bf16 = x2.dtype == torch.bfloat16
    weight_tiles = config.get("WEIGHT_TILES", 1)
    grid = (sum(-(-n // (16 * warps * weight_tiles)) for n in row_counts), split_k)
    _nf4_mma_gemv_kernel[grid](
        x2, packed, absmax, *_nested_args(absmax, nested_absmax, offset), dyn, bf16_pairs if bf16 else fp16_pairs,
        bias if bias is not None else out, out, M, N, K, x2.stride(0), out.stride(0),
        *_sibling_args(siblings, packed, absmax, out),
        QBLOCK=block_size, DOUBLE_QUANT=nested_absmax is not None, HAS_BIAS=bias is not None, WARPS=warps,
        SPLIT_K=split_k, CHUNKS=config["CHUNKS"], QUAD_SCALES=config.get("scales") == "quad",
        ROW_TILES=1 if M <= 8 else 2, WEIGHT_TILES=weight_tiles, BF16=bf16, WEIGHTS=1 + len(siblings),
        num_warps=warps, num_stages=1, enable_fp_fusion=FP_FUSION,
    )
    return out if split_k == 1 else out.to(x2.dtype)


# mm ---------------------------------------------------------------------------------------------


@triton.jit
def _load_x_t(x_ptr, m, M, r, RED, stride_xm, EVEN: tl.constexpr):
    """x^T [len(r), len(m)]: rows m of x over the reduced columns r. Rows past M are always masked (M is
    free); the reduced axis only when not EVEN."""
    x_mask = (m < M)[None, :]
    if not EVEN:
        x_mask = x_mask & (r < RED)[:, None]
    return tl.load(x_ptr + m[None, :] * stride_xm + r[:, None], mask=x_mask, other=0.0)


@triton.jit
def _nf4_mm_kernel(
    x_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, dyn_ptr, pair_ptr, bias_ptr, out_ptr,
    M, N, K, stride_w, stride_xm, stride_om,
    packed1_ptr, absmax1_ptr, nested1_ptr, offset1_ptr, bias1_ptr, N1,
    packed2_ptr, absmax2_ptr, nested2_ptr, offset2_ptr, bias2_ptr, N2,
    QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
    X_AT_W: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_RED: tl.constexpr,
    GROUPS: tl.constexpr, SUB: tl.constexpr, SPLIT_K: tl.constexpr, EVEN: tl.constexpr, SHUFFLE: tl.constexpr,
    PAIRS: tl.constexpr, SCALE_AFTER: tl.constexpr, WEIGHTS: tl.constexpr,
):
    # out^T [BLOCK_OUT, BLOCK_M] += A @ x^T, A the decoded tile W[out, red] (x @ W.T) or W[red, out]^T
    # (x @ W). M is the fastest grid axis, so the programs sharing a weight tile run together and
    # its codes come from L2 after the first of them.
    # SCALE_AFTER (x @ W.T only): one dot per group of SUB columns (one scale per row of A), of the
    # bare codebook values, its result scaled: a multiply-add per output element instead of a
    # multiply per weight (BLOCK_M outputs against SUB weights a row).
    tile = tl.program_id(1)
    out_col0 = 0
    if WEIGHTS > 1:  # x @ W.T only: W is that many weights (_sibling_weight), side by side in each output row
        tile, out_col0, N, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, bias_ptr = _sibling_weight(
            tile, BLOCK_OUT, N, N1, N2, WEIGHTS, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, bias_ptr,
            packed1_ptr, absmax1_ptr, nested1_ptr, offset1_ptr, bias1_ptr,
            packed2_ptr, absmax2_ptr, nested2_ptr, offset2_ptr, bias2_ptr,
        )
    if X_AT_W:
        OUT = K
        RED = N
    else:
        OUT = N
        RED = K
    pid_k = tl.program_id(2)
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = tile * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    red_per_split = tl.cdiv(tl.cdiv(RED, BLOCK_RED), SPLIT_K) * BLOCK_RED
    r_start = pid_k * red_per_split
    if PAIRS:
        table = codebook_pairs(pair_ptr)
    else:
        table = _codebook(code_ptr, SHUFFLE)
    acc = tl.zeros([BLOCK_OUT, BLOCK_M], dtype=tl.float32)
    for r0 in range(r_start, tl.minimum(r_start + red_per_split, RED), BLOCK_RED):
        if SCALE_AFTER:
            for g in tl.static_range(GROUPS):
                words, scale = _load_tile(
                    packed_ptr, absmax_ptr, nested_ptr, offset_ptr, dyn_ptr,
                    o, o < N, r0 + g * SUB, K, stride_w, QBLOCK, DOUBLE_QUANT, 1, SUB, EVEN,
                )
                a = tl.reshape(_decode_words(table, words, SHUFFLE, PAIRS), [BLOCK_OUT, SUB])
                x_t = _load_x_t(x_ptr, m, M, r0 + g * SUB + tl.arange(0, SUB), RED, stride_xm, EVEN)
                acc += tl.dot(a.to(DOT_DTYPE), x_t.to(DOT_DTYPE)) * scale
        else:
            r = r0 + tl.arange(0, BLOCK_RED)
            if X_AT_W:
                words, scale = _load_tile(
                    packed_ptr, absmax_ptr, nested_ptr, offset_ptr, dyn_ptr,
                    r, r < N, tile * BLOCK_OUT, K, stride_w, QBLOCK, DOUBLE_QUANT, GROUPS, SUB, EVEN,
                )
                a = tl.trans(tl.reshape(_decode_words(table, words, SHUFFLE, PAIRS) * scale[:, :, None, None], [BLOCK_RED, BLOCK_OUT]))
            else:
                words, scale = _load_tile(
                    packed_ptr, absmax_ptr, nested_ptr, offset_ptr, dyn_ptr,
                    o, o < N, r0, K, stride_w, QBLOCK, DOUBLE_QUANT, GROUPS, SUB, EVEN,
                )
                a = tl.reshape(_decode_words(table, words, SHUFFLE, PAIRS) * scale[:, :, None, None], [BLOCK_OUT, BLOCK_RED])
            acc = tl.dot(a.to(DOT_DTYPE), _load_x_t(x_ptr, m, M, r, RED, stride_xm, EVEN).to(DOT_DTYPE), acc)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + o, mask=o < OUT, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[:, None]
    offs = m[None, :] * stride_om + out_col0 + o[:, None]
    _write_out(out_ptr + offs, acc, (m < M)[None, :] & (o < OUT)[:, None], SPLIT_K)


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
    # The same tiles decoding by warp shuffles (fewer instructions and registers; see _decode), and by
    # "pairs" (two codes a shared-memory read from codebook_pairs' 32 KB table, opted in beside Triton's
    # shared memory: fit_pair_table).
    *[dict(tile, lookup=lookup) for lookup in ("shuffle", "pairs") for tile in (
        dict(BLOCK_M=16, BLOCK_OUT=64, BLOCK_RED=128, SPLIT_K=4, num_warps=4, num_stages=3),
        dict(BLOCK_M=16, BLOCK_OUT=64, BLOCK_RED=256, SPLIT_K=2, num_warps=4, num_stages=3),
        dict(BLOCK_M=16, BLOCK_OUT=128, BLOCK_RED=128, SPLIT_K=4, num_warps=4, num_stages=4),
        dict(BLOCK_M=32, BLOCK_OUT=64, BLOCK_RED=128, SPLIT_K=2, num_warps=4, num_stages=3),
        dict(BLOCK_M=64, BLOCK_OUT=64, BLOCK_RED=128, SPLIT_K=1, num_warps=4, num_stages=3),
        dict(BLOCK_M=64, BLOCK_OUT=128, BLOCK_RED=128, SPLIT_K=1, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_OUT=128, BLOCK_RED=64, SPLIT_K=1, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_OUT=128, BLOCK_RED=128, SPLIT_K=1, num_warps=8, num_stages=3),
        dict(BLOCK_M=256, BLOCK_OUT=128, BLOCK_RED=64, SPLIT_K=1, num_warps=8, num_stages=3),
    )],
    # Scale after the dot (x @ W.T; see the kernel): 16-30% fewer instructions a weight than the same
    # tile scaled before and fewer registers (offline sm_90 compiles), but on an H100 within 5% of the
    # scale-before plans: both are bound by the L1/shared-memory pipe, not by issue (ncu, bench/NOTES.md).
    # By pairs they won M = 4-16 on four of the seven shapes (twelfth session). Only for M <= 16: where M fills
    # BLOCK_M = 64 the multiply-adds on the outputs cost what the multiplies on the weights saved.
    *[dict(BLOCK_M=16, BLOCK_OUT=out, BLOCK_RED=red, SPLIT_K=split, num_warps=4, num_stages=3, lookup=lookup,
           scale="after")
      for lookup in ("shuffle", "pairs") for out, red in ((128, 128), (128, 64), (64, 256)) for split in (1, 2, 4)],
]


def nf4_mm(x2, packed, absmax, nested_absmax, offset, block_size, N, K, bias, x_at_w, config, siblings=()):
    """Launch wrapper: x2 [M, K] @ W.T, or x2 [M, N] @ W with ``x_at_w`` (+ bias), in x2.dtype. ``siblings``
    (x @ W.T only): as nf4_gemv's, their outputs after W's in each row [M, N + rows1 + rows2]."""
    assert len(siblings) <= 2 and not (siblings and x_at_w), "the mm kernel reads at most three weights, x @ W.T"
    M = x2.shape[0]
    col_counts = (K,) if x_at_w else (N, *(w[4] for w in siblings))
    split_k = config["SPLIT_K"]
    out = _output(M, sum(col_counts), x2, split_k)
    code, dyn, pairs, _ = lookup_tables(x2.device)
    shuffle, _, use_pairs = _lookups(config, x2.dtype)
    tile_w = config["BLOCK_OUT"] if x_at_w else config["BLOCK_RED"]  # columns of W per tile
    sub = min(tile_w, block_size)
    grid = (-(-M // config["BLOCK_M"]), sum(-(-n // config["BLOCK_OUT"]) for n in col_counts), split_k)
    args = (x2, packed, absmax, *_nested_args(absmax, nested_absmax, offset), code, dyn, pairs,
            bias if bias is not None else out, out, M, N, K, K // 8, x2.stride(0), out.stride(0),
            *_sibling_args(siblings, packed, absmax, out))
    meta = dict(
        QBLOCK=block_size, DOUBLE_QUANT=nested_absmax is not None, HAS_BIAS=bias is not None,
        # The interpreter computes bf16 dots wrongly: there the dot runs in fp32.
        X_AT_W=x_at_w, DOT_DTYPE=tl.float32 if INTERPRET else _TL_DTYPES[x2.dtype],
        BLOCK_M=config["BLOCK_M"], BLOCK_OUT=config["BLOCK_OUT"], BLOCK_RED=config["BLOCK_RED"],
        GROUPS=tile_w // sub, SUB=sub, SPLIT_K=split_k, SHUFFLE=shuffle, PAIRS=use_pairs,
        SCALE_AFTER=config.get("scale") == "after" and not x_at_w,
        EVEN=all(n % config["BLOCK_OUT"] == 0 for n in col_counts) and (N if x_at_w else K) % config["BLOCK_RED"] == 0,
        WEIGHTS=1 + len(siblings), num_warps=config["num_warps"], num_stages=config["num_stages"],
        enable_fp_fusion=FP_FUSION,
    )
    if use_pairs and not INTERPRET:
        # The GEMM's own shared memory plus the pair table may pass 48 KB: the compiled kernel is opted in
        # before its launch, then launched as compiled (one pass through Triton's binder, as for other plans;
        # Triton's launcher takes every argument of the signature, the constexprs after ``args`` included).
        kernel = _nf4_mm_kernel.warmup(*args, grid=grid, **meta)
        fit_pair_table(kernel, x2.device)
        kernel[grid](*args, *(meta[name] for name in _nf4_mm_kernel.arg_names[len(args):]))
    else:
        _nf4_mm_kernel[grid](*args, **meta)
    return out if split_k == 1 else out.to(x2.dtype)


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _lookups(config, dtype) -> tuple[bool, bool, bool]:
    """The kernels' (SHUFFLE, MIXED, PAIRS) flags for a config's "lookup" and the activations' dtype.

    Shuffles (and "mixed", gemv only) run no PTX in the interpreter: there they take the shared-memory
    lookup (the same values). The pair table holds fp16 values (relative error up to 2**-11, no more than the
    rounding of a 16-bit result): fp32 activations, which the gemv computes exactly, decode the same tile
    by shuffles instead."""
    lookup = config.get("lookup")
    if lookup == "pairs" and dtype == torch.float32:
        lookup = "shuffle"
    shuffle = lookup in ("shuffle", "mixed") and not INTERPRET
    return shuffle, shuffle and lookup == "mixed", lookup == "pairs"


def _sibling_args(siblings, packed, absmax, out) -> list:
    """The kernels' slots for two sibling weights: each (packed, absmax, nested_absmax, offset, rows, bias) as
    the kernel reads it; slots past ``siblings`` take any pointer (never read)."""
    args = []
    for sibling_packed, sibling_absmax, sibling_nested, sibling_offset, rows, sibling_bias in siblings:
        args += [sibling_packed, sibling_absmax, *_nested_args(sibling_absmax, sibling_nested, sibling_offset),
                 sibling_bias if sibling_bias is not None else out, rows]
    return args + [packed, absmax, absmax, absmax, out, 0] * (2 - len(siblings))


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
    if not x_at_w and M == 1:
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
        # fp32 activations would run a pairs config by shuffles (_lookups): the shuffle configs are timed instead.
        configs = GEMV_CONFIGS if bucket == 1 else GEMV_ROWS_CONFIGS
        plans += [{"path": "gemv", "config": c} for c in configs if dtype in _TL_DTYPES or c.get("lookup") != "pairs"]
    if not x_at_w and bucket <= MMA_GEMV_MAX_M and dtype in _TL_DTYPES:
        plans += [{"path": "mma_gemv", "config": c} for c in MMA_GEMV_CONFIGS]
    if dtype in _TL_DTYPES:
        # Tiles no taller than the bucket (16 at least), and none far shorter where M is large.
        fits = lambda c: c["BLOCK_M"] <= max(bucket, 16) and c["BLOCK_M"] * 4 >= min(bucket, 512)
        # Scale-after configs only for x @ W.T (x @ W's scales vary along the reduced axis: they would
        # run the scale-before kernel a second time) and M <= 16 (above, they measured 2.5-10x slower).
        scale_after = lambda c: c.get("scale") == "after" and not x_at_w and bucket <= 16
        plans += [{"path": "mm", "config": c} for c in MM_CONFIGS if fits(c) and (scale_after(c) or "scale" not in c)]
    return plans


def run_plan(plan, x2, packed, absmax, nested_absmax, offset, block_size, N, K, bias, x_at_w, siblings=()):
    """[M, out] = x2 @ W.T or x2 @ W (+ bias) along ``plan``. ``siblings`` (a fused path's x @ W.T only): more
    weights in one launch, their outputs after W's (see nf4_gemv)."""
    if plan["path"] == "gemv":
        return nf4_gemv(x2, packed, absmax, nested_absmax, offset, block_size, N, K, bias, plan["config"], siblings)
    if plan["path"] == "mma_gemv":
        return nf4_mma_gemv(x2, packed, absmax, nested_absmax, offset, block_size, N, K, bias, plan["config"], siblings)
    if plan["path"] == "mm":
        return nf4_mm(x2, packed, absmax, nested_absmax, offset, block_size, N, K, bias, x_at_w, plan["config"], siblings)
    assert not siblings, "the dequantize path takes one weight"
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


def _plan_key(x2, N, K, block_size, x_at_w) -> tuple:
    return (x_at_w, N, K, _m_bucket(x2.shape[0]), x2.dtype, block_size)


def autotune_requested() -> bool:
    """NF4COMPILE_AUTOTUNE=1: untuned keys are tuned on first use (and chips without plans of their own tune theirs)."""
    return os.environ.get("NF4COMPILE_AUTOTUNE") == "1"


def _shipped_plans(device: torch.device) -> dict[tuple, dict]:
    """Plans tuned by bench/nf4_kernels.py --tune on this device's chip (or one with its SM), if shipped."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    if name not in _SHIPPED:
        plans = {}
        path = None
        if device.type == "cuda":
            path = plans_file(name, torch.cuda.get_device_capability(device), autotune_requested())
        if path is not None:
            for entry in json.loads(path.read_text())["plans"]:
                key = (entry["x_at_w"], entry["N"], entry["K"], entry["m_bucket"])
                plans[key] = {k: entry[k] for k in ("path", "config") if k in entry}
        _SHIPPED[name] = plans
    return _SHIPPED[name]


def _nearest_shipped(key, M, dtype, device) -> Optional[dict]:
    # A bucket that was not tuned borrows the plan of the nearest tuned bucket of the same shape,
    # if that plan can serve this M and dtype. An untuned shape (a sibling group's rows together,
    # another model's widths) borrows the plan of the tuned shape with its K, its M bucket and the
    # nearest N: any gemv or mm config serves any shape, and a tuned one beat the defaults on every shape.
    # A gemv plan serves its own bucket only: a tile tuned for one row may spill registers with eight. An mma_gemv
    # plan serves any M up to 8 at one cost (an mma computes 8 activation rows whatever M is): its shape's buckets up
    # to 8 may borrow it, other widths only at its own bucket. (Buckets 9-16 take its second tile of rows, 102 registers
    # against 64: only a plan tuned at 16.)
    x_at_w, N, K, bucket = key
    usable, of_width = [], []
    for (xw, n, k, b), plan in _shipped_plans(device).items():
        if (xw, k) != (x_at_w, K) or (plan["path"] == "gemv" and b != bucket):
            continue
        if plan["path"] == "mma_gemv" and b != bucket and (n != N or bucket > GEMV_MAX_M):
            continue
        if n != N:
            if b == bucket and (plan["path"] == "gemv" or (plan["path"] in ("mm", "mma_gemv") and dtype in _TL_DTYPES)):
                of_width.append((abs(math.log(n / N)), n, plan))
        elif plan["path"] not in ("mm", "mma_gemv") or dtype in _TL_DTYPES:
            usable.append((abs(b.bit_length() - bucket.bit_length()), -b, plan))
    if usable:
        return min(usable, key=lambda t: t[:2])[2]
    return min(of_width, key=lambda t: t[:2])[2] if of_width else None


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


def fastest_plan(plans, make_calls, timings=None) -> Optional[dict]:
    """The plan of ``plans`` whose calls (``make_calls(plan)``: one per weight copy) replay fastest as one
    CUDA graph; a plan that does not fit the GPU (OutOfResources) is skipped. ``timings``, a list,
    receives (plan, ms) for each plan timed."""
    best, best_ms = None, float("inf")
    for plan in plans:
        try:
            ms = cuda_graph_us(make_calls(plan)) / 1e3
        except triton.runtime.errors.OutOfResources:
            continue
        if timings is not None:
            timings.append((plan, ms))
        if ms < best_ms:
            best, best_ms = plan, ms
    return best


def remember_plan(x2, N, K, block_size, x_at_w, plan) -> None:
    """Caches ``plan`` for calls like ``x2``'s (its M bucket and dtype), as tuning does."""
    _PLANS[_plan_key(x2, N, K, block_size, x_at_w)] = plan


def tune_plan(x2, packed, absmax, nested_absmax, offset, block_size, N, K, bias, x_at_w, timings=None) -> dict:
    """Time every candidate plan on these arguments, as CUDA-graph replays over copies of the weight
    that overflow L2, and cache the fastest; ``timings``, a list, receives (plan, ms) for each."""
    weight = (packed, absmax, nested_absmax, offset)
    nbytes = sum(t.numel() * t.element_size() for t in weight if t is not None)
    l2 = torch.cuda.get_device_properties(x2.device).L2_cache_size
    n_copies = min(64, -(-TUNE_L2_FACTOR * l2 // nbytes))
    copies = [[None if t is None else t.clone() for t in weight] for _ in range(n_copies)]
    best = fastest_plan(
        candidate_plans(x2.shape[0], x_at_w, x2.dtype),
        lambda plan: [lambda c=c: run_plan(plan, x2, *c, block_size, N, K, bias, x_at_w) for c in copies],
        timings,
    )
    remember_plan(x2, N, K, block_size, x_at_w, best)
    return best


def plan_for(x2, packed, absmax, nested_absmax, offset, block_size, N, K, bias, x_at_w) -> dict:
    return cached_plan(x2, N, K, block_size, x_at_w, lambda: tune_plan(
        x2, packed, absmax, nested_absmax, offset, block_size, N, K, bias, x_at_w))


def cached_plan(x2, N, K, block_size, x_at_w, tune=None) -> dict:
    """The plan for (x_at_w, N, K, M bucket, dtype, block size), chosen once: shipped, else tuned by
    ``tune`` (a weight of this shape is timed; None: never), else the defaults."""
    M = x2.shape[0]
    key = _plan_key(x2, N, K, block_size, x_at_w)
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
            autotune = autotune_requested() and x2.is_cuda and not capturing and not INTERPRET
            if tune is not None and autotune:
                return tune()
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
    if plan["path"] == "mma_gemv":
        # 64-column chunks within one quantization block; activations read 16 bytes at a time.
        return (not x_at_w and M <= MMA_GEMV_MAX_M and x2.dtype in _TL_DTYPES and block_size % 64 == 0
                and x2.data_ptr() % 16 == 0 and x2.stride(0) % 8 == 0 and plan["config"]["SPLIT_K"] <= MAX_GRID_YZ
                and M * max(x2.stride(0), N) <= MAX_INT32_OFFSET)
    out_dim = K if x_at_w else N
    return (
        x2.dtype in _TL_DTYPES
        and -(-out_dim // plan["config"]["BLOCK_OUT"]) <= MAX_GRID_YZ
        and plan["config"]["SPLIT_K"] <= MAX_GRID_YZ
        and M * max(x2.stride(0), out_dim) <= MAX_INT32_OFFSET
    )


def _codes_aligned(plan: dict, packed: torch.Tensor) -> bool:
    # The fused kernels read the codes as 32-bit words, the mma gemv two at a time: codes at an address they
    # cannot read are dequantized.
    return packed.data_ptr() % (8 if plan["path"] == "mma_gemv" else 4) == 0


def _bias_fits(bias, out_dim: int, x: torch.Tensor) -> bool:
    return bias is None or (bias.shape == (out_dim,) and bias.device == x.device and bias.dtype in ACTIVATION_DTYPES)


def nf4_linear(x, packed, absmax, nested_absmax, offset, block_size, out_features, in_features, bias=None,
               x_at_w=False, plan=None):
    """``nf4compile.linear`` on CUDA tensors (any tensors under TRITON_INTERPRET=1); ``plan`` forces a path."""
    N, K = out_features, in_features
    red, out_dim = (N, K) if x_at_w else (K, N)
    if x.dim() == 0 or x.shape[-1] != red or x.dtype not in ACTIVATION_DTYPES or x.device != packed.device or not _bias_fits(bias, out_dim, x):
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
    if not _codes_aligned(plan, packed) or not kernel_can_serve(plan, x2, N, K, block_size, x_at_w):
        plan = DEQUANT_PLAN
    out = run_plan(plan, *args)
    return out if x.dim() == 2 else out.view(out_shape)


def _linear_cuda(x, packed, absmax, nested_absmax, offset, block_size, out_features, in_features, bias=None,
                 x_at_w=False):
    return nf4_linear(x, packed, absmax, nested_absmax, offset, block_size, out_features, in_features, bias, x_at_w)


register_kernel("linear", "CUDA", _linear_cuda)


def nf4_linear_group(x, packed, absmax, nested_absmax, offset, block_size, out_features, in_features, bias, plan=None):
    """``nf4compile.linear_group`` on CUDA tensors (any under TRITON_INTERPRET=1): two or three weights of one
    scale format in one launch of a fused kernel (run_plan's siblings), where the plan of one weight of all the
    group's rows takes one; else each linear on its own path, outputs concatenated. ``plan`` forces the plan."""
    check_linear_group_args(packed, absmax, nested_absmax, offset, out_features, bias)
    K, N = in_features, sum(out_features)
    weights = list(zip(packed, absmax, nested_absmax, offset, out_features, bias))
    if x.dim() and x.shape[-1] == K and x.numel() and x.dtype in ACTIVATION_DTYPES and 2 <= len(weights) <= 3:
        x2 = x.reshape(-1, K)
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        # Shipped or borrowed from the nearest tuned width, or the defaults: never tuned from here.
        plan = plan or cached_plan(x2, N, K, block_size, False)
        first = weights[0]
        if plan["path"] != "dequant" and kernel_can_serve(plan, x2, N, K, block_size, False) and all(
            (n is None) == (first[2] is None) and (b is None) == (first[5] is None)  # one scale format and bias use
            and p.device == x.device and _codes_aligned(plan, p) and well_formed(p, a, n, o, block_size, rows * K)
            and _bias_fits(b, rows, x)
            for p, a, n, o, rows, b in weights
        ):
            (p0, a0, n0, o0, rows0, b0), *siblings = [(p.reshape(-1), a.reshape(-1), n, o, rows, b) for p, a, n, o, rows, b in weights]
            out = run_plan(plan, x2, p0, a0, n0, o0, block_size, rows0, K, b0, False, siblings)
            return out.view(*x.shape[:-1], N)
    return torch.cat([nf4_linear(x, p, a, n, o, block_size, rows, K, b) for p, a, n, o, rows, b in weights], dim=-1)


def _linear_group_cuda(x, packed, absmax, nested_absmax, offset, block_size, out_features, in_features, bias):
    return nf4_linear_group(x, packed, absmax, nested_absmax, offset, block_size, out_features, in_features, bias)


register_kernel("linear_group", "CUDA", _linear_group_cuda)
