"""The nf4compile custom ops: quantize, dequantize, the fused NF4 linear and its sibling group.

They are opaque custom ops on purpose: opaque to torch.compile and torch.export, so the graph
passes can find ``nf4compile.dequantize`` and rewrite it into ``nf4compile.linear``. Each op has a fake
implementation (shapes only), a plain-PyTorch implementation that serves every device, and CUDA
kernels registered by the Triton modules beside this one. quantize and dequantize are
``torch.library.custom_op``s; linear, called once per layer per token when decoding, is defined with
``torch.library.Library`` instead: custom_op's Python layer (alias checks over every input, a
dynamo-disable frame) cost 30 of the 72 us one call spent on the host of an H100 machine
(bench/NOTES.md, "Host overhead"). Same schema, same opacity.

Scales are passed as ``absmax`` (fp32), or, double-quantized, as ``absmax`` (uint8 codes) plus
``nested_absmax`` and ``offset``; see ``nf4compile.format``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from nf4compile import format as nf4_format


def check_scales(
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Optional[Tensor],
    offset: Optional[Tensor],
    block_size: int,
    numel: int,
) -> None:
    """Refuse inconsistent NF4 data with a message, before any kernel indexes out of bounds."""
    nf4_format.check_block_size(block_size)
    torch._check(packed.dtype == torch.uint8, lambda: f"NF4 packed codes must be uint8, got {packed.dtype}")
    torch._check(
        packed.numel() == (numel + 1) // 2,
        lambda: f"NF4 packed codes hold {packed.numel()} bytes, expected {(numel + 1) // 2} for {numel} elements",
    )
    torch._check_value(
        absmax.device == packed.device,
        lambda: f"NF4 absmax is on {absmax.device} but the packed codes are on {packed.device}",
    )
    blocks = nf4_format.num_blocks(numel, block_size)
    torch._check(
        absmax.numel() == blocks,
        lambda: f"NF4 absmax has {absmax.numel()} entries, expected {blocks} blocks of {block_size}",
    )
    if nested_absmax is None:
        torch._check(offset is None, lambda: "NF4 offset given without nested_absmax")
        torch._check(absmax.dtype == torch.float32, lambda: f"NF4 absmax must be float32, got {absmax.dtype}")
        return
    torch._check(offset is not None, lambda: "double-quantized NF4 needs an offset")
    torch._check_value(
        nested_absmax.device == offset.device == packed.device,
        lambda: f"NF4 nested_absmax and offset are on {nested_absmax.device} and {offset.device}, the codes on {packed.device}",
    )
    torch._check(absmax.dtype == torch.uint8, lambda: f"double-quantized absmax must be uint8, got {absmax.dtype}")
    nested = nf4_format.num_blocks(blocks, nf4_format.NESTED_BLOCK_SIZE)
    torch._check(
        nested_absmax.numel() == nested,
        lambda: f"NF4 nested_absmax has {nested_absmax.numel()} entries, expected {nested}",
    )


def resolve_absmax(absmax: Tensor, nested_absmax: Optional[Tensor], offset: Optional[Tensor]) -> Tensor:
    if nested_absmax is None:
        return absmax
    return nf4_format.dequantize_absmax(absmax, nested_absmax, offset)


# quantize ---------------------------------------------------------------------------------------


@torch.library.custom_op("nf4compile::quantize", mutates_args=())
def quantize(weight: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Blockwise NF4 quantization -> (packed uint8 [(n+1)//2], absmax fp32 [n_blocks])."""
    nf4_format.check_block_size(block_size)
    return nf4_format.quantize_nf4(weight, block_size)


@quantize.register_fake
def _(weight: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    numel = weight.numel()
    packed = weight.new_empty(((numel + 1) // 2,), dtype=torch.uint8)
    absmax = weight.new_empty((nf4_format.num_blocks(numel, block_size),), dtype=torch.float32)
    return packed, absmax


# dequantize -------------------------------------------------------------------------------------


@torch.library.custom_op("nf4compile::dequantize", mutates_args=())
def dequantize(
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Optional[Tensor],
    offset: Optional[Tensor],
    block_size: int,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> Tensor:
    """NF4 -> dense ``dtype`` tensor of ``shape``, exactly as bitsandbytes' dequantize_4bit."""
    numel = math.prod(shape)
    check_scales(packed, absmax, nested_absmax, offset, block_size, numel)
    scales = resolve_absmax(absmax, nested_absmax, offset)
    return nf4_format.dequantize_nf4(packed, scales, block_size, tuple(shape), dtype)


@dequantize.register_fake
def _(packed, absmax, nested_absmax, offset, block_size, shape, dtype):
    check_scales(packed, absmax, nested_absmax, offset, block_size, math.prod(shape))
    return packed.new_empty(tuple(shape), dtype=dtype)


# linear -----------------------------------------------------------------------------------------


ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def linear_output_shape(x: Tensor, out_features, in_features, x_at_w: bool) -> tuple:
    """``x @ W.T`` takes [..., in] to [..., out]; ``x @ W`` (x_at_w) takes [..., out] to [..., in]."""
    reduce_dim, out_dim = (out_features, in_features) if x_at_w else (in_features, out_features)
    torch._check(
        x.dim() >= 1 and x.shape[-1] == reduce_dim,
        lambda: f"NF4 linear: input's last dimension is {x.shape[-1] if x.dim() else None}, "
        f"expected {reduce_dim} for a weight of shape [{out_features}, {in_features}]"
        + (" used as x @ W" if x_at_w else ""),
    )
    return (*x.shape[:-1], out_dim)


def check_linear_args(x: Tensor, packed: Tensor, bias: Optional[Tensor], out_features, in_features, x_at_w: bool) -> tuple:
    """Refuse activations and biases that no kernel can take (a kernel would read a wrong-sized bias
    out of bounds, or a CPU pointer from the GPU), with a message; returns the output shape."""
    torch._check_type(
        x.dtype in ACTIVATION_DTYPES,
        lambda: f"NF4 linear: the input is {x.dtype}; it must be float16, bfloat16, float32 or float64",
    )
    shape = linear_output_shape(x, out_features, in_features, x_at_w)
    torch._check_value(
        x.device == packed.device, lambda: f"NF4 linear: the input is on {x.device} but the NF4 weight is on {packed.device}"
    )
    if bias is not None:
        torch._check_value(
            bias.dim() == 1 and bias.shape[0] == shape[-1] and bias.dtype in ACTIVATION_DTYPES,
            lambda: f"NF4 linear: the bias must be a float vector of {shape[-1]} elements, got {bias.dtype} {list(bias.shape)}",
        )
        torch._check_value(
            bias.device == x.device, lambda: f"NF4 linear: the bias is on {bias.device} but the input is on {x.device}"
        )
    return shape


_LIBRARY = torch.library.Library("nf4compile", "FRAGMENT")
_LIBRARY.define(
    "linear(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? offset, SymInt block_size, "
    "SymInt out_features, SymInt in_features, Tensor? bias=None, bool x_at_w=False) -> Tensor"
)
linear = torch.ops.nf4compile.linear.default


def register_kernel(op_name: str, device_key: str, kernel) -> None:
    """``kernel`` serves ``nf4compile.<op_name>`` ("linear", "linear_group") on ``device_key`` ("CUDA"),
    called by the dispatcher directly."""
    _LIBRARY.impl(op_name, kernel, device_key)


def _linear_reference(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Optional[Tensor],
    offset: Optional[Tensor],
    block_size: int,
    out_features: int,
    in_features: int,
    bias: Optional[Tensor] = None,
    x_at_w: bool = False,
) -> Tensor:
    """``x @ W.T + bias`` for an NF4 weight W of shape [out, in]; ``x @ W + bias`` with ``x_at_w``.

    The plain-PyTorch path dequantizes to the activation dtype and calls the dense matmul, which is
    also what a traced graph computes before the passes fuse it.
    """
    check_linear_args(x, packed, bias, out_features, in_features, x_at_w)
    weight = dequantize(packed, absmax, nested_absmax, offset, block_size, [out_features, in_features], x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    if x_at_w:
        out = x @ weight
        return out if bias is None else out + bias
    return torch.nn.functional.linear(x, weight, bias)


_LIBRARY.impl("linear", _linear_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("nf4compile::linear")
def _(x, packed, absmax, nested_absmax, offset, block_size, out_features, in_features, bias=None, x_at_w=False):
    check_scales(packed, absmax, nested_absmax, offset, block_size, out_features * in_features)
    return x.new_empty(check_linear_args(x, packed, bias, out_features, in_features, x_at_w))


def _linear_setup_context(ctx, inputs, output):
    x, packed, absmax, nested_absmax, offset, block_size, out_features, in_features, bias, x_at_w = inputs
    ctx.save_for_backward(packed, absmax, nested_absmax, offset)
    ctx.weight_args = (block_size, out_features, in_features, x_at_w)
    ctx.bias_needs_grad = bias is not None and bias.requires_grad
    ctx.bias_dtype = None if bias is None else bias.dtype


def _linear_backward(ctx, grad_out):
    # The NF4 weight is frozen: only the input (and a trainable bias) get gradients. The gradient of
    # x @ W.T is grad @ W, the same fused op with x_at_w flipped.
    packed, absmax, nested_absmax, offset = ctx.saved_tensors
    block_size, out_features, in_features, x_at_w = ctx.weight_args
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = linear(
            grad_out, packed, absmax, nested_absmax, offset, block_size, out_features, in_features,
            None, not x_at_w,
        )
    grad_bias = None
    if ctx.bias_needs_grad:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, None, None, None, grad_bias, None


torch.library.register_autograd("nf4compile::linear", _linear_backward, setup_context=_linear_setup_context)


# linear_group -----------------------------------------------------------------------------------

# Sibling linears of one input (q, k and v; gate and up) in one op: the GroupSiblingLinears pass makes
# it, so that at decode one kernel launch reads every weight of the group (bench/NOTES.md). An
# inference-only op (the pass runs on graphs autograd is done with): no autograd formula.
_LIBRARY.define(
    "linear_group(Tensor x, Tensor[] packed, Tensor[] absmax, Tensor?[] nested_absmax, Tensor?[] offset, "
    "SymInt block_size, SymInt[] out_features, SymInt in_features, Tensor?[] bias) -> Tensor"
)
linear_group = torch.ops.nf4compile.linear_group.default


def check_linear_group_args(packed, absmax, nested_absmax, offset, out_features, bias) -> None:
    count = len(packed)
    torch._check_value(count >= 1, lambda: "NF4 linear_group needs at least one weight")
    torch._check_value(
        all(len(arg) == count for arg in (absmax, nested_absmax, offset, out_features, bias)),
        lambda: "NF4 linear_group: packed, absmax, nested_absmax, offset, out_features and bias must list "
        f"the same number of weights, got {[len(a) for a in (packed, absmax, nested_absmax, offset, out_features, bias)]}",
    )


def _linear_group_reference(x, packed, absmax, nested_absmax, offset, block_size, out_features, in_features, bias):
    """``cat([x @ W_i.T + b_i for each weight i], -1)``: the output of each sibling linear, side by side."""
    check_linear_group_args(packed, absmax, nested_absmax, offset, out_features, bias)
    return torch.cat([
        linear(x, p, a, n, o, block_size, out, in_features, b)
        for p, a, n, o, out, b in zip(packed, absmax, nested_absmax, offset, out_features, bias)
    ], dim=-1)


_LIBRARY.impl("linear_group", _linear_group_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("nf4compile::linear_group")
def _(x, packed, absmax, nested_absmax, offset, block_size, out_features, in_features, bias):
    check_linear_group_args(packed, absmax, nested_absmax, offset, out_features, bias)
    for p, a, n, o, out, b in zip(packed, absmax, nested_absmax, offset, out_features, bias):
        check_scales(p, a, n, o, block_size, out * in_features)
        check_linear_args(x, p, b, out, in_features, False)
    return x.new_empty((*x.shape[:-1], sum(out_features)))
