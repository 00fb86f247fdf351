"""The NF4 format exactly as bitsandbytes stores it, in plain PyTorch.

These functions are the reference algorithm: the CPU implementations of the custom ops call them,
the Triton kernels are tested against them, and the tests check them byte for byte against
bitsandbytes itself.

Layout of a weight of shape ``shape`` with ``n`` elements:
  packed         uint8 [(n + 1) // 2]   two 4-bit codes per byte, element 2j in the high nibble
  absmax         fp32  [ceil(n / block_size)]   one scale per block of the row-major flattened weight
or, double-quantized:
  absmax         uint8 [ceil(n / block_size)]   codes of (absmax - offset) in the signed dynamic map
  nested_absmax  fp32  [ceil(n_blocks / 256)]
  offset         fp32  []                        the mean of the fp32 absmax
"""

from __future__ import annotations

import math

import torch

# bitsandbytes.functional.get_4bit_type("nf4"); these literals are canonical (recomputing them from
# normal quantiles differs in the last bits).
NF4_CODEBOOK = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
NF4_MIDPOINTS = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2
ZERO_CODE = 7
# Value pairs of every byte (high nibble first): one lookup decodes two weights.
NF4_PAIRS = torch.stack([NF4_CODEBOOK.repeat_interleave(16), NF4_CODEBOOK.repeat(16)], dim=1)

SUPPORTED_BLOCK_SIZES = tuple(2**i for i in range(5, 13))  # what bitsandbytes accepts: 32 ... 4096
NESTED_BLOCK_SIZE = 256  # bitsandbytes' fixed block size for double quantization of the scales


def _signed_dynamic_map() -> torch.Tensor:
    """bitsandbytes.functional.create_dynamic_map(signed=True): 8-bit dynamic-exponent codes.

    Built the way bitsandbytes builds it (fp32 linspace, means, then Python float products), so
    the table is identical to the ``nested_quant_map`` in its checkpoints.
    """
    max_exponent_bits, non_sign_bits = 7, 7
    data: list[float] = []
    for i in range(max_exponent_bits):
        boundaries = torch.linspace(0.1, 1, 2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist() + (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_MAP = _signed_dynamic_map()


def check_block_size(block_size: int) -> None:
    if type(block_size) is not int or block_size not in SUPPORTED_BLOCK_SIZES:  # 64.0 == 64, True == 1
        raise ValueError(
            f"block_size must be a power of two from 32 to 4096 (bitsandbytes' NF4 format), "
            f"got {block_size!r}"
        )


def num_blocks(numel: int, block_size: int) -> int:
    return math.ceil(numel / block_size)


def _blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """View a 1-D tensor as [n_blocks, block_size], zero-padding the partial last block."""
    pad = num_blocks(flat.numel(), block_size) * block_size - flat.numel()
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)


# Elements quantized per step: the fp32 and index temporaries (~20 bytes an element) stay at ~5 MB
# whatever the layer's size (what a streamed load needs, bench/stream_memory.py). A multiple of every
# block size, so blocks never straddle two steps.
QUANTIZE_CHUNK = 2**18


def quantize_nf4(weight: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax NF4 quantization -> (packed uint8 [(n+1)//2], absmax fp32 [n_blocks])."""
    flat = weight.reshape(-1)
    packed = torch.empty((flat.numel() + 1) // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(num_blocks(flat.numel(), block_size), dtype=torch.float32, device=flat.device)
    for start in range(0, flat.numel(), QUANTIZE_CHUNK):
        chunk = flat[start : start + QUANTIZE_CHUNK]
        scales = _blocks(chunk.to(torch.float32), block_size).abs().amax(dim=1)
        absmax[start // block_size : start // block_size + scales.numel()] = scales
        packed[start // 2 : start // 2 + (chunk.numel() + 1) // 2] = quantize_nf4_with_scales(chunk, scales, block_size)
    return packed, absmax


def nearest_codes(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """NF4 code of each ``value / scale`` by bitsandbytes' rule (``scales`` broadcasts against
    ``values``). Any scale is valid in the format: bitsandbytes only ever multiplies the code by it."""
    scaled = _scale(values, scales).clamp_(-1, 1)
    # bucketize(right=False) sends a value equal to a midpoint to the lower code, as bitsandbytes does.
    return torch.bucketize(scaled, NF4_MIDPOINTS.to(scaled.device)).to(torch.uint8)


def _scale(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``values * (1 / scales)`` in fp32, bitsandbytes' rounding. A zero scale (an all-zero block)
    gives 0, not 0 * inf = NaN; a subnormal scale, whose inverse overflows to inf, divides instead
    (bitsandbytes' own codes are erratic there: it has no exact result to match)."""
    inv = 1.0 / scales
    overflow = torch.isinf(inv)
    scaled = values * torch.where(overflow, 0.0, inv)
    if overflow.any():
        scaled = torch.where(overflow & (scales != 0), values / scales, scaled)
    return scaled


def quantize_nf4_with_scales(weight: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """NF4 codes of ``weight`` for given per-block scales (e.g. clipped ones) -> packed uint8.

    ``absmax`` is the fp32 scale per block that bitsandbytes will multiply by (with double
    quantization: the reconstructed scale, ``dequantize_absmax``), so the result dequantizes to the
    nearest grid point of every element under exactly those scales.
    """
    flat = weight.reshape(-1).to(torch.float32)
    codes = nearest_codes(_blocks(flat, block_size), absmax.reshape(-1, 1).to(torch.float32))
    return pack_codes(codes.view(-1)[: flat.numel()])


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    if codes.numel() % 2:  # bitsandbytes pads an odd count with the code of 0.0
        codes = torch.cat([codes, codes.new_full((1,), ZERO_CODE)])
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)[:numel]


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    block_size: int,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """code[nibble] * absmax[block] in fp32, then cast: bitsandbytes' dequantize_4bit."""
    numel = math.prod(shape)
    values = NF4_PAIRS.to(packed.device)[packed.reshape(-1).long()].view(-1)[:numel]
    values = _blocks(values, block_size) * absmax.reshape(-1, 1)
    return values.view(-1)[:numel].view(shape).to(dtype)


def _grid_lookup_table(code: torch.Tensor, grid_points: int = 65536) -> torch.Tensor:
    """Code index of each point of an even grid over [-1, 1]: the smallest k whose midpoint
    (code[k] + code[k+1]) / 2 is >= the grid value (255 if none), all in fp32."""
    j = torch.arange(grid_points, dtype=torch.float32)
    grid = (2.0 * j) / (grid_points - 1) - 1.0
    midpoints = (code[1:] + code[:-1]) * 0.5
    return torch.searchsorted(midpoints, grid, right=False).to(torch.uint8)


_DYNAMIC_MAP_LUT = _grid_lookup_table(DYNAMIC_MAP)


def quantize_blockwise_dynamic(
    x: torch.Tensor, block_size: int = NESTED_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization to the signed dynamic map -> (uint8 codes, fp32 absmax).

    Byte-identical to bitsandbytes' native CPU kernel (``quantize_cpu_impl`` in its
    ``csrc/cpu_ops.cpp``), which is not nearest rounding: the scaled value is first snapped to a
    65536-point grid over [-1, 1] and the grid point is looked up (~0.2% of codes differ from
    nearest rounding, by one or two steps), and an all-zero block gets code 0, not the code of 0.0.
    """
    flat = x.reshape(-1).to(torch.float32)
    blocks = _blocks(flat, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = _scale(blocks, absmax[:, None]).clamp(-1, 1)
    # fp32 (t * 65535 + 0.5) truncated: the same index as the kernel's fused multiply-add for every
    # fp32 t in [0, 1] (checked exhaustively).
    grid_index = (((scaled + 1.0) * 0.5) * 65535.0 + 0.5).long()
    codes = _DYNAMIC_MAP_LUT.to(x.device)[grid_index]
    codes = torch.where((absmax == 0)[:, None], 0, codes)
    # clone: a view into the padded buffer would drag the padding into every saved file
    return codes.view(-1)[: flat.numel()].clone(), absmax


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes' compress_statistics -> (absmax codes uint8, nested_absmax fp32, offset fp32 [])."""
    offset = absmax.mean()
    codes, nested_absmax = quantize_blockwise_dynamic(absmax - offset, NESTED_BLOCK_SIZE)
    return codes, nested_absmax, offset


def dequantize_absmax(
    absmax_codes: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """dynamic_map[code] * nested_absmax[block] + offset, in fp32 and in bitsandbytes' order."""
    n = absmax_codes.numel()
    values = DYNAMIC_MAP.to(absmax_codes.device)[absmax_codes.reshape(-1).long()]
    values = _blocks(values, NESTED_BLOCK_SIZE) * nested_absmax.reshape(-1, 1)
    return values.view(-1)[:n] + offset
