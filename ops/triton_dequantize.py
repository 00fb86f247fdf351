"""CUDA implementation of ``nf4compile.dequantize``: one Triton pass from NF4 to a dense tensor.

Also home of the pieces every NF4 kernel shares: the device copies of the two lookup tables and
``load_scales``, which resolves (double-quantized) block scales inside a kernel.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os

import torch
import triton
import triton.language as tl

from nf4compile import format as nf4_format
from nf4compile.ops.nf4_ops import check_scales, dequantize

# Kernels run PTX (inline asm) only when compiled; under TRITON_INTERPRET=1 they take a plain-Triton path
# with the same values. A constexpr, so that kernels may read it; host code reads it as a bool.
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

_TABLES: dict[torch.device, tuple[torch.Tensor, ...]] = {}

# The codebook values of each byte's two codes (high nibble first) as fp16 pairs packed in an int32
# (the first in the low half): "pairs" plans decode two weights per shared-memory read. fp16 keeps 11
# significant bits (relative error <= 2**-11 per value, below the bf16 rounding of a dequantized weight).
NF4_FP16_PAIRS = nf4_format.NF4_PAIRS.to(torch.float16).view(torch.int32).reshape(256)
# The same pairs in bf16: the mma gemv's operand for bf16 activations (8 significant bits, as the bf16 weight
# that dequantize writes; the block scale multiplies the mma's fp32 result).
NF4_BF16_PAIRS = nf4_format.NF4_PAIRS.to(torch.bfloat16).view(torch.int32).reshape(256)


def lookup_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(NF4 codebook fp32[16], signed dynamic map fp32[256], codebook pairs int32[256] as fp16 and as bf16) on
    ``device``, copied once.

    Cached so that a call inside a CUDA graph capture never copies from the host.
    """
    if device not in _TABLES:
        _TABLES[device] = tuple(t.to(device) for t in (
            nf4_format.NF4_CODEBOOK, nf4_format.DYNAMIC_MAP, NF4_FP16_PAIRS, NF4_BF16_PAIRS))
    return _TABLES[device]


def well_formed(packed, absmax, nested_absmax, offset, block_size, numel) -> bool:
    """The fast form of check_scales, which runs (and raises its message) only when this fails:
    a decode call must not spend tens of microseconds validating."""
    n_blocks = -(-numel // block_size)
    if block_size not in nf4_format.SUPPORTED_BLOCK_SIZES:
        return False
    if packed.numel() != (numel + 1) // 2 or absmax.numel() != n_blocks:
        return False
    if packed.dtype != torch.uint8 or (offset is None) != (nested_absmax is None):
        return False
    device = packed.device  # a kernel given a tensor on another device would read a wrong pointer
    if absmax.device != device:
        return False
    if nested_absmax is None:
        return absmax.dtype == torch.float32
    return (
        absmax.dtype == torch.uint8 and nested_absmax.numel() == -(-n_blocks // 256)
        and nested_absmax.device == device and offset.device == device
    )


@triton.jit
def masked_load(ptr, mask, other, EVEN: tl.constexpr):
    """tl.load, without the mask where the caller knows every element is in bounds (EVEN): the
    predicates cost instructions in kernels that decode a weight every few instructions."""
    if EVEN:
        return tl.load(ptr)
    else:
        return tl.load(ptr, mask=mask, other=other)


@triton.jit
def load_scale_parts(absmax_ptr, nested_ptr, blk, mask, DOUBLE_QUANT: tl.constexpr, EVEN: tl.constexpr):
    """What the scales of quantization blocks ``blk`` are rebuilt from, as two tensors: the fp32
    absmax (twice), or with double quantization its 8-bit code and nested_absmax[blk // 256].
    Loaded apart from resolve_scales so that a kernel can load a step ahead and resolve later."""
    if DOUBLE_QUANT:
        code = masked_load(absmax_ptr + blk, mask, 0, EVEN).to(tl.int32)
        nested = masked_load(nested_ptr + blk // 256, mask, 0.0, EVEN)
        return code, nested
    else:
        absmax = masked_load(absmax_ptr + blk, mask, 0.0, EVEN)
        return absmax, absmax


@triton.jit
def resolve_scales(part, nested, offset_ptr, dyn_ptr, DOUBLE_QUANT: tl.constexpr, dyn_table=None):
    """fp32 scales from load_scale_parts: dynamic_map[code] * nested + offset, in bitsandbytes' order.
    With ``dyn_table`` (the 256-entry map loaded into registers before a loop) the map is read by
    gather_table, from shared memory, instead of by a global gather per code."""
    if DOUBLE_QUANT:
        if dyn_table is None:
            dyn = tl.load(dyn_ptr + part)
        else:
            dyn = gather_table(dyn_table, part)
        return dyn * nested + tl.load(offset_ptr)
    else:
        return part


@triton.jit
def load_scales(absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, blk, mask, DOUBLE_QUANT: tl.constexpr,
                EVEN: tl.constexpr):
    """The fp32 absmax of quantization blocks ``blk`` (0 where masked)."""
    part, nested = load_scale_parts(absmax_ptr, nested_ptr, blk, mask, DOUBLE_QUANT, EVEN)
    return resolve_scales(part, nested, offset_ptr, dyn_ptr, DOUBLE_QUANT)


@triton.jit
def gather_table(table, idx):
    """table[idx] for a small table held in registers (any shape of idx). Triton stages the table in
    shared memory (one or two stores a thread per step for 16 or 256 entries), so a read is one shared load:
    no global request, and invisible to the software pipeliner (which turned global codebook gathers
    into per-element async copies)."""
    flat = tl.reshape(idx, [idx.numel])
    return tl.reshape(tl.gather(table, flat, 0), idx.shape)


@triton.jit
def lookup(table, idx):
    """table[idx & 15] for the 16-entry codebook (gather_table): free of bank conflicts, 16 entries
    in 16 banks."""
    return gather_table(table, idx & 0xF)


@triton.jit
def lane_codebook(code_ptr):
    """For shuffle_lookup: this lane's codebook entry (lane % 16). A scalar, so every thread holds
    its own lane's entry and no layout conversion can move it to another lane. GPU only (PTX)."""
    lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r", [], dtype=tl.int32, is_pure=True, pack=1)
    return tl.load(code_ptr + lane % 16)


@triton.jit
def shuffle_lookup(entry, idx):
    """codebook[idx & 15] as one warp shuffle from lane_codebook's entries: no shared memory and no
    mask (segment mask 0x10: the shuffle reads lane (lane & 16) | (idx & 15)), so fewer
    instructions than lookup; on an H100 either costs one wavefront of the L1's data pipe per 32
    codes (ncu, bench/NOTES.md). All lanes of a warp must execute it
    together (the kernels have no divergent branches). GPU only (PTX)."""
    return tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x101f, -1;", "=f,f,r", [entry, idx],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def codebook_pairs(pair_ptr):
    """What pair_lookup reads: on a GPU this lane's byte offset (4 * lane) in a shared-memory copy of the
    256 codebook pairs (int32 each), in the interpreter the pairs themselves.

    The copy is staged once per program, one copy per lane (entry e of lane l at word 32 e + l, 32 KB),
    so that any 32 reads of a warp hit 32 banks: one L1 data-pipe wavefront per 64 codes, half what
    shuffles cost (the gemv's bound, bench/NOTES.md). A static array declared in PTX because Triton 3.6
    gives a kernel no shared memory of its own: a tl.gather from a staged table restages it in the loop.
    Called once per kernel (the PTX declares a symbol)."""
    if INTERPRET:
        return tl.load(pair_ptr + tl.arange(0, 256))
    else:
        base = tl.inline_asm_elementwise(".shared .align 16 .b32 nf4_pairs[8192];\n\tmov.u32 $0, nf4_pairs;", "=r", [],
                                         dtype=tl.int32, is_pure=False, pack=1)
        quad = tl.arange(0, 2048)  # 16 bytes each: one entry's copies for 4 lanes
        tl.inline_asm_elementwise("st.shared.v4.b32 [$1], {$2, $2, $2, $2};\n\tmov.u32 $0, 0;", "=r,r,r",
                                  [base + 16 * quad, tl.load(pair_ptr + quad // 8)], dtype=tl.int32, is_pure=False, pack=1)
        # Side-effecting asm keeps its order: every thread's stores, then the barrier, then any read.
        return tl.inline_asm_elementwise("bar.sync 0;\n\tmov.u32 $0, %laneid;\n\tshl.b32 $0, $0, 2;", "=r", [],
                                         dtype=tl.int32, is_pure=False, pack=1)


# CUfunction attributes (cuda.h).
_CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES = 1
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
_FITTED_KERNELS: set[int] = set()


@functools.cache
def _libcuda() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def fit_pair_table(kernel, device: torch.device) -> None:
    """Lets a compiled Triton kernel (``JITFunction.warmup``'s result) that stages codebook_pairs' table launch
    with more than 48 KB of shared memory in all, where the GPU allows it.

    CUDA launches a kernel with over 48 KB only if it was opted in (cuFuncSetAttribute), and Triton opts in only
    where its own, dynamic share passes 48 KB: the table's 32 KB are static (declared in PTX), so a GEMM tile that
    needs 16-48 KB of Triton's would fail to launch. Raises OutOfResources, as Triton does, where the sum passes
    the GPU's limit. Once per loaded kernel."""
    kernel._init_handles()  # loads the module (Triton does so lazily, at the first launch)
    if kernel.function in _FITTED_KERNELS:
        return
    static = ctypes.c_int()
    _check_cuda(_libcuda().cuFuncGetAttribute(ctypes.byref(static), _CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
                                              ctypes.c_void_p(kernel.function)))
    limit = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    needed = static.value + kernel.metadata.shared
    if needed > limit:
        raise triton.runtime.errors.OutOfResources(needed, limit, "shared memory")
    if needed > 48 * 1024:
        _check_cuda(_libcuda().cuFuncSetAttribute(ctypes.c_void_p(kernel.function),
                                                  _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                                  ctypes.c_int(limit - static.value)))
    _FITTED_KERNELS.add(kernel.function)


def _check_cuda(result: int) -> None:
    if result != 0:
        raise RuntimeError(f"CUDA driver error {result} while opting a kernel into more shared memory")


@triton.jit
def pair_values(pair, BF16: tl.constexpr = False):
    """The two fp32 values of fp16 (or BF16) pairs (the first in the low half)."""
    if BF16:
        return (pair << 16).to(tl.float32, bitcast=True), (pair & -65536).to(tl.float32, bitcast=True)
    else:
        low = (pair & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        high = ((pair >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return low, high


# Byte j of a 32-bit word moved to bits 7-14 by this shift (then masked with 32640): its pair's entry lies at
# 128 * byte + 4 * lane past codebook_pairs' table.
PAIR_BYTE_SHIFTS = [("shl.b32", 7), ("shr.b32", 1), ("shr.b32", 9), ("shr.b32", 17)]
# pair_lookup's PTX: byte j of the word ($8) moved to its entry (the lane's offset $9 in bits 2-6; the table's
# address is a constant that ptxas folds into the load), one shared-memory read, the pair's halves widened into
# outputs 2j and 2j + 1.
_PAIR_BYTE_PTX = """
        {shift} a, $8, {bits};
        and.b32 a, a, 32640;
        or.b32 a, a, $9;
        add.u32 a, a, t;
        ld.shared.b32 p, [a];
        mov.b32 {{lo, hi}}, p;
        cvt.f32.f16 ${low}, lo;
        cvt.f32.f16 ${high}, hi;"""
_PAIR_LOOKUP_PTX = tl.constexpr(
    "{\n        .reg .b32 a, p, t;\n        .reg .b16 lo, hi;\n        mov.u32 t, nf4_pairs;"
    + "".join(_PAIR_BYTE_PTX.format(shift=shift, bits=bits, low=2 * j, high=2 * j + 1)
              for j, (shift, bits) in enumerate(PAIR_BYTE_SHIFTS))
    + "\n        }"
)


@triton.jit
def pair_lookup(pairs, words):
    """The codebook values (fp32) of each 32-bit word's 8 codes, in element order (8 tensors): one
    shared-memory read per byte from codebook_pairs' copy, which ``pairs`` addresses."""
    if INTERPRET:
        d0, d1 = pair_values(gather_table(pairs, words & 0xFF))
        d2, d3 = pair_values(gather_table(pairs, (words >> 8) & 0xFF))
        d4, d5 = pair_values(gather_table(pairs, (words >> 16) & 0xFF))
        d6, d7 = pair_values(gather_table(pairs, (words >> 24) & 0xFF))
        return d0, d1, d2, d3, d4, d5, d6, d7
    else:
        return tl.inline_asm_elementwise(_PAIR_LOOKUP_PTX, "=f,=f,=f,=f,=f,=f,=f,=f,r,r", [words, pairs],
                                         dtype=(tl.float32,) * 8, is_pure=True, pack=1)


@triton.jit
def _nf4_dequantize_kernel(
    packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, dyn_ptr, out_ptr,
    numel, nbytes,
    QBLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    BLOCK: tl.constexpr, SUB: tl.constexpr,
):
    # A program decodes BLOCK consecutive elements of the flattened weight, seen as rows of SUB
    # elements (SUB divides QBLOCK), so each row has one scale however the blocks meet the weight's
    # rows. Bytes are loaded contiguously and their two nibbles interleaved in registers.
    start = tl.program_id(0).to(tl.int64) * BLOCK
    row = start + tl.arange(0, BLOCK // SUB) * SUB
    byte_idx = row[:, None] // 2 + tl.arange(0, SUB // 2)[None, :]
    byte = tl.load(packed_ptr + byte_idx, mask=byte_idx < nbytes, other=0).to(tl.int32)
    scale = load_scales(absmax_ptr, nested_ptr, offset_ptr, dyn_ptr, row // QBLOCK, row < numel, DOUBLE_QUANT, False)
    values = lookup(tl.load(code_ptr + tl.arange(0, 16)), tl.interleave(byte >> 4, byte))
    offs = row[:, None] + tl.arange(0, SUB)[None, :]
    tl.store(out_ptr + offs, (values * scale[:, None]).to(out_ptr.dtype.element_ty), mask=offs < numel)


# A streaming kernel: 4096 elements per program (16 bytes of codes a thread: one wide load) keep HBM
# busy, and one
# fixed config avoids tuning a pass whose cost is set by its bytes.
DEQUANT_BLOCK = 4096
DEQUANT_WARPS = 4


def nf4_dequantize(packed, absmax, nested_absmax, offset, block_size, shape, dtype):
    """Launch wrapper: NF4 -> dense ``dtype`` [shape], bit-identical to ``nf4compile.format``."""
    numel = math.prod(shape)
    if not well_formed(packed, absmax, nested_absmax, offset, block_size, numel):
        check_scales(packed, absmax, nested_absmax, offset, block_size, numel)  # raises
    if packed.dim() != 1:
        packed, absmax = packed.reshape(-1), absmax.reshape(-1)
    out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    if numel == 0:
        return out
    code, dyn, _, _ = lookup_tables(packed.device)
    double_quant = nested_absmax is not None
    grid = (-(-numel // DEQUANT_BLOCK),)
    _nf4_dequantize_kernel[grid](
        packed, absmax, nested_absmax if double_quant else absmax, offset if double_quant else absmax,
        code, dyn, out, numel, packed.numel(),
        QBLOCK=block_size, DOUBLE_QUANT=double_quant,
        BLOCK=DEQUANT_BLOCK, SUB=min(DEQUANT_BLOCK, block_size),
        num_warps=DEQUANT_WARPS,
        # No mul+add contraction: the double-quant scale must round as bitsandbytes' separate ops do.
        enable_fp_fusion=False,
    )
    return out


@dequantize.register_kernel("cuda")
def _dequantize_cuda(packed, absmax, nested_absmax, offset, block_size, shape, dtype):
    return nf4_dequantize(packed, absmax, nested_absmax, offset, block_size, shape, dtype)
