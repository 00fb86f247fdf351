"""CUDA implementation of ``nf4compile.dequantize``: one Triton pass from NF4 to a dense tensor.

Also home of the pieces every NF4 kernel shares: the device copies of the two lookup tables and
``load_scales``, which resolves (double-quantized) block scales inside a kernel.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nf4compile import format as nf4_format
from nf4compile.ops.nf4_ops import check_scales, dequantize

_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def lookup_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(NF4 codebook fp32[16], signed dynamic map fp32[256]) on ``device``, copied once.

    Cached so that a call inside a CUDA graph capture never copies from the host.
    """
    if device not in _TABLES:
        _TABLES[device] = (nf4_format.NF4_CODEBOOK.to(device), nf4_format.DYNAMIC_MAP.to(device))
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
    code, dyn = lookup_tables(packed.device)
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
