"""Shards of an NF4 weight: the NF4Tensor ops that FSDP2 and DTensor apply when they split a weight.

A shard is itself an NF4Tensor in bitsandbytes' format: the codes and scales of a range of rows
(FSDP2, ``ColwiseParallel``: ``Shard(0)``) or of columns (``RowwiseParallel``: ``Shard(1)``). Blocks are
runs of ``block_size`` elements of the row-major flattened weight, so a shard boundary must fall on a
block boundary; ``torch.chunk``/``split`` of a weight whose shards would cut a block raise a ValueError
that says so. Double-quantized scales come in groups of 256 blocks sharing one ``nested_absmax``: when
shard boundaries cut such groups, every shard of that split holds its scales as plain fp32 (the values
``nf4_format.dequantize_absmax`` reconstructs, which the dequantization uses), so each shard still
dequantizes exactly like the same elements of the whole weight, at 0.5 instead of ~0.13 bit per weight.

FSDP2 all-gathers the shards' codes and scales (``fsdp_pre_all_gather``/``fsdp_post_all_gather``,
called from the NF4Tensor methods of those names): the gathered bytes are the NF4 bytes, never a dense
weight. Views that reshape a non-transposed weight (``view(-1)``, ``as_strided`` back to its shape) stay
NF4: the blocks are defined on the flattened data, so any such view is exact.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.fx.operator_schemas import normalize_function
from torch.utils._python_dispatch import return_and_correct_aliasing

from nf4compile import format as nf4_format
from nf4compile.tensor import NF4Tensor, _call_dense, implements

aten = torch.ops.aten
GROUP = nf4_format.NESTED_BLOCK_SIZE  # scale blocks per nested_absmax entry


def _named(func, args, kwargs) -> dict:
    """The op's arguments by schema name (``self`` is called ``input``), defaults filled in."""
    return normalize_function(func, args, kwargs, normalize_to_only_use_kwargs=True).kwargs


# --- scales of a range of blocks ------------------------------------------------------------------


def _groups_aligned(t: NF4Tensor, boundaries) -> bool:
    """Whether double-quantized scale groups survive cuts at these block indices (end of scales excepted)."""
    return all(b % GROUP == 0 or b == t.absmax.numel() for b in boundaries)


def _resolved_scales(t: NF4Tensor) -> Tensor:
    return nf4_format.dequantize_absmax(t.absmax, t.nested_absmax, t.offset)


def _scales(t: NF4Tensor, first: int, last: int, resolved: Optional[Tensor]) -> dict:
    """Scales of blocks [first, last) as NF4Tensor keyword arguments: views of ``t``'s, or of ``resolved``
    (its fp32 scales) when double-quantized groups are cut."""
    if resolved is not None:
        return dict(absmax=resolved[first:last])
    if not t.double_quant:
        return dict(absmax=t.absmax[first:last])
    nested = t.nested_absmax[first // GROUP : math.ceil(last / GROUP)]
    return dict(absmax=t.absmax[first:last], nested_absmax=nested, offset=t.offset)


# --- ranges of the quantized data -----------------------------------------------------------------


def _check_bounds(t: NF4Tensor, dim: int, bounds: list[int]) -> None:
    """Raise unless shards of ``t`` along ``dim`` between ``bounds`` consist of whole NF4 blocks."""
    rows, cols = t.quant_shape if t.dim() == 2 else (t.numel(), 1)
    quant_dim = (1 - dim) if t.transposed else dim
    if quant_dim == 0:  # ranges of rows: consecutive elements, cut anywhere between blocks
        cuts = [b * cols for b in bounds if 0 < b < rows]
        where = "rows" if t.dim() == 2 else "elements"
        need = "out_features / shards x in_features" if t.dim() == 2 else "elements / shards"
    else:  # ranges of columns: every row is cut, so blocks must not span rows either
        cuts = [cols, *bounds]
        where, need = "columns", "in_features and in_features / shards"
    if any(cut % t.block_size for cut in cuts):
        raise ValueError(
            f"nf4compile: cannot shard {t!r} between {where} {list(bounds)} of its quantized data "
            f"{list(t.quant_shape)}: a shard boundary would cut a {t.block_size}-element NF4 block. FSDP2 and "
            f"tensor parallelism need shards of whole blocks: {need} must be a multiple of {t.block_size}; "
            "use another number of shards or a smaller NF4Config(block_size=...)"
        )


def _flat_ranges(t: NF4Tensor, bounds: list[int]) -> list[NF4Tensor]:
    """Shards of consecutive element ranges [bounds[i], bounds[i+1]) (whole rows when 2-D): views of this
    tensor's codes and scales."""
    block_bounds = [math.ceil(b / t.block_size) for b in bounds]
    resolved = _resolved_scales(t) if t.double_quant and not _groups_aligned(t, block_bounds) else None
    shards = []
    for start, stop, first, last in zip(bounds, bounds[1:], block_bounds, block_bounds[1:]):
        shape = (stop - start,) if t.dim() == 1 else ((stop - start) // t.quant_shape[1], t.quant_shape[1])
        shards.append(
            NF4Tensor(
                packed=t.packed[start // 2 : (stop + 1) // 2], block_size=t.block_size, quant_shape=shape,
                dtype=t.dtype, transposed=t.transposed, **_scales(t, first, last, resolved),
            )
        )
    return shards


def _column_ranges(t: NF4Tensor, bounds: list[int]) -> list[NF4Tensor]:
    """Shards of columns [bounds[i], bounds[i+1]) of the quantized data [out, in] (copies: not contiguous)."""
    rows, cols = t.quant_shape
    per_row = cols // t.block_size
    block_bounds = [b // t.block_size for b in bounds]
    keep_groups = not t.double_quant or (per_row % GROUP == 0 and _groups_aligned(t, block_bounds))
    packed = t.packed.view(rows, cols // 2)
    scales = t.absmax if keep_groups else _resolved_scales(t)
    shards = []
    for start, stop, first, last in zip(bounds, bounds[1:], block_bounds, block_bounds[1:]):
        inner = dict(
            packed=packed[:, start // 2 : stop // 2].reshape(-1),
            absmax=scales.view(rows, per_row)[:, first:last].reshape(-1),
        )
        if t.double_quant and keep_groups:
            nested = t.nested_absmax.view(rows, per_row // GROUP)
            inner.update(nested_absmax=nested[:, first // GROUP : last // GROUP].reshape(-1), offset=t.offset)
        shards.append(
            NF4Tensor(**inner, block_size=t.block_size, quant_shape=(rows, stop - start), dtype=t.dtype,
                      transposed=t.transposed)
        )
    return shards


def shards(t: NF4Tensor, dim: int, bounds: list[int]) -> list[NF4Tensor]:
    """NF4 shards of ``t`` between ``bounds`` (increasing indices along ``t``'s dimension ``dim``); a
    ValueError if a boundary would cut an NF4 block."""
    dim = dim % t.dim()
    _check_bounds(t, dim, bounds)
    if (1 - dim if t.transposed else dim) == 0:
        return _flat_ranges(t, [b * (t.quant_shape[1] if t.dim() == 2 else 1) for b in bounds])
    return _column_ranges(t, bounds)


def _on_block_boundaries(t: NF4Tensor, dim: int, bounds: list[int]) -> bool:
    try:
        _check_bounds(t, dim, bounds)
    except ValueError:
        return False
    return True


@implements([aten.split.Tensor])
def _split(func, args, kwargs):
    """``torch.chunk``/``split`` (FSDP2 and DTensor shard with them): equal NF4 shards, else an error."""
    arguments = _named(func, args, kwargs)
    t, size, dim = arguments["input"], arguments["split_size"], arguments["dim"] % arguments["input"].dim()
    length = t.shape[dim]
    if length % size:
        raise ValueError(
            f"nf4compile: cannot split {t!r} into equal shards of {size} along dim {dim} ({length} is not a "
            "multiple): NF4 weights are sharded evenly (out_features, or in_features for column shards, must be "
            "divisible by the number of shards)"
        )
    pieces = shards(t, dim, list(range(0, length + 1, size)))
    return return_and_correct_aliasing(func, args, kwargs, pieces)


@implements([aten.slice.Tensor])
def _slice(func, args, kwargs):
    """A block-aligned range of rows/columns stays NF4 (FSDP2 narrows its padded shard); others are dense."""
    arguments = _named(func, args, kwargs)
    t, dim = arguments["input"], arguments["dim"] % arguments["input"].dim()
    start, stop, _ = slice(arguments["start"], arguments["end"], arguments["step"]).indices(t.shape[dim])
    if arguments["step"] != 1 or stop <= start or not _on_block_boundaries(t, dim, [start, stop]):
        return _call_dense(func, args, kwargs)
    (piece,) = shards(t, dim, [start, stop])
    return return_and_correct_aliasing(func, args, kwargs, piece)


def _reshaped(t: NF4Tensor, size) -> Optional[NF4Tensor]:
    """``t`` viewed as ``size`` (1-D or 2-D, same elements, row-major): exact for a non-transposed weight."""
    size = list(size)
    if -1 in size:
        size[size.index(-1)] = t.numel() // max(1, -math.prod(size))
    if t.transposed or len(size) not in (1, 2) or math.prod(size) != t.numel():
        return None
    return t._with(quant_shape=torch.Size(size))


@implements([aten.view.default, aten._unsafe_view.default])
def _view(func, args, kwargs):
    arguments = _named(func, args, kwargs)
    viewed = _reshaped(arguments["input"], arguments["size"])
    if viewed is None:  # e.g. ahead of bmm: the dense result (the traced dequantize -> view chain)
        return _call_dense(func, args, kwargs)
    return return_and_correct_aliasing(func, args, kwargs, viewed)


@implements([aten.as_strided.default])
def _as_strided(func, args, kwargs):
    """FSDP2 presents its all-gathered weight as ``as_strided(t, shape, contiguous strides, 0)``."""
    arguments = _named(func, args, kwargs)
    t, size = arguments["input"], arguments["size"]
    contiguous = list(arguments["stride"]) == list(torch._prims_common.make_contiguous_strides_for(size))
    viewed = _reshaped(t, size) if contiguous and not arguments["storage_offset"] else None
    if viewed is None:
        raise NotImplementedError(
            f"nf4compile: as_strided{tuple(size), tuple(arguments['stride']), arguments['storage_offset']} "
            f"of {t!r}: only a contiguous view of the whole weight is supported; call weight.dequantize() first"
        )
    return return_and_correct_aliasing(func, args, kwargs, viewed)


@implements([aten.new_zeros.default])
def _new_zeros(func, args, kwargs):
    """An all-zero NF4 weight of ``size`` laid out like a shard of this one (FSDP2's padded shard buffer)."""
    arguments = _named(func, args, kwargs)
    t, size = arguments["input"], torch.Size(arguments["size"])
    if t.transposed:
        raise NotImplementedError(
            f"nf4compile: FSDP2 cannot shard {t!r}: a transposed NF4 weight (a transformers Conv1D) is sharded "
            "along the columns of its quantized data, which all-gather cannot concatenate"
        )
    if arguments["dtype"] not in (None, t.dtype) or len(size) not in (1, 2) or size.numel() % t.block_size:
        raise NotImplementedError(
            f"nf4compile: new_zeros({list(size)}, dtype={arguments['dtype']}) of {t!r}: only NF4 buffers of "
            f"whole {t.block_size}-element blocks in the weight's dtype are supported"
        )
    device = arguments["device"] or t.device
    blocks = nf4_format.num_blocks(size.numel(), t.block_size)
    zero_pair = nf4_format.ZERO_CODE << 4 | nf4_format.ZERO_CODE  # both nibbles the code of 0.0
    packed = torch.full(((size.numel() + 1) // 2,), zero_pair, dtype=torch.uint8, device=device)
    # Scales as a shard of this size would hold them (see _flat_ranges): groups kept if whole.
    keep_groups = t.double_quant and (size.numel() == t.numel() or blocks % GROUP == 0)
    inner = dict(absmax=torch.zeros(blocks, dtype=torch.float32, device=device))
    if keep_groups:
        inner = dict(
            absmax=torch.zeros(blocks, dtype=torch.uint8, device=device),
            nested_absmax=torch.zeros(nf4_format.num_blocks(blocks, GROUP), dtype=torch.float32, device=device),
            offset=torch.zeros((), dtype=torch.float32, device=device),
        )
    return NF4Tensor(packed=packed, block_size=t.block_size, quant_shape=size, dtype=t.dtype, **inner)


@implements([aten.empty_like.default])
def _empty_like(func, args, kwargs):
    return args[0]._with(torch.empty_like)


@implements([torch.ops.c10d.scatter_.default])
def _scatter(func, args, kwargs):
    """DTensor's ``distribute_tensor(src_data_rank=0)`` scatters rank 0's shards: one scatter per inner tensor."""
    arguments = _named(func, args, kwargs)
    (output,) = arguments["output_tensors"]
    sources = arguments["input_tensors"]
    work = None
    for name in output.__tensor_flatten__()[0]:
        inputs = [[getattr(t, name) for t in sources[0]]] if sources else []
        # Always async_op=True, then wait: re-issued blocking (async_op=False, as distribute_tensor asks),
        # NCCL's scatter killed both ranks with SIGSEGV in this call (2x H200, torch 2.11; gloo was fine).
        _, work = func([getattr(output, name)], inputs, arguments["process_group"], arguments["root_rank"],
                       True, arguments["timeout"])
        work.wait()
    return [output], work


# --- FSDP2's all-gather extension -----------------------------------------------------------------


def fsdp_pre_all_gather(t: NF4Tensor, outer_size: torch.Size):
    """What FSDP2 all-gathers for a shard: its codes and scales; the rest travels as metadata. (A transposed
    weight never gets here: FSDP2's ``new_zeros`` of it raises.)"""
    inputs = (t.packed, t.absmax) + ((t.nested_absmax,) if t.double_quant else ())
    return inputs, (t.block_size, torch.Size(outer_size), t.offset)


def fsdp_post_all_gather(all_gather_outputs, metadata, param_dtype: torch.dtype, out: Optional[NF4Tensor]):
    """The whole weight from the gathered codes and scales (FSDP2 frees and refills these buffers)."""
    block_size, shape, offset = metadata
    packed, absmax, *nested = all_gather_outputs
    if out is not None:  # a later all-gather refilled the buffers that ``out`` already holds
        if out.packed.untyped_storage().data_ptr() != packed.untyped_storage().data_ptr():
            raise RuntimeError("nf4compile: FSDP2 all-gathered into buffers other than the NF4 weight's")
        return None
    weight = NF4Tensor(packed, absmax, block_size, shape, param_dtype, False, nested[0] if nested else None, offset)
    return weight, tuple(all_gather_outputs)
